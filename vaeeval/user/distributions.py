"""Any torch.distributions object as a posterior, a prior or p(x|z): keyed draws, the KL, the measure.

The ``--arch`` protocol lets a model return distributions. vaeeval then needs, from any of
them: draws keyed by (seed, point, sample) so that numbers never depend on the batch
(``keyed_sample``, for the families it can write as a transform of standard noise:
Normal, Independent, MultivariateNormal, LowRankMultivariateNormal, TransformedDistribution
(normalizing flows), MixtureSameFamily; or of the uniforms that noise is the quantiles of:
Bernoulli, Categorical, OneHotCategorical, RelaxedBernoulli, RelaxedOneHotCategorical;
anything else is drawn by its own ``sample`` under a generator seeded per batch, and
the model's notes say so), the KL when torch registers it in closed form
(``analytic_kl``), whether its numbers are densities or probabilities (its support),
and log p(x|z) summed over a data point, on the data's bins where asked (``log_prob_of``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    Laplace,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    TransformedDistribution,
    constraints,
    kl_divergence,
)

from vaeeval.core import numerics, rng
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods import GaussianLikelihood, LaplaceLikelihood
from vaeeval.format.likelihoods.base import bin_edges, finite_edges, log_symmetric_bin
from vaeeval.format.terms import DENSITY, PROBABILITY
from vaeeval.user import discrete
from vaeeval.user.calls import call_user
from vaeeval.user.checks import Refused, checked_total, describe, log_probabilities
from vaeeval.user.quadrature import log_bin_from_cdf

_MIXTURE_STREAM = 20  # rng stream of a mixture's component draws; normal draws are stream 0, as evaluate's


class SelfKeyed(Distribution):
    """A distribution that writes its own draws as a transform of vaeeval's keyed noise (a hierarchical latent's
    chain of factors, ``user/hierarchy.py``): ``keyed``, ``noise_width``, ``transform`` and ``first_rows`` ask it."""

    @property
    def noise_width(self) -> int:
        raise NotImplementedError

    def keyed_transform(self, normal: torch.Tensor, unit: torch.Tensor | None) -> torch.Tensor:
        """Draws ``[*prefix, *event_shape]`` from normals ``[*prefix, W]`` and, where given, their uniforms."""
        raise NotImplementedError

    def first_rows(self, rows: int) -> Distribution | None:
        raise NotImplementedError


def own(distribution: Distribution, *methods: str) -> bool:
    """Its class leaves ``methods`` as the torch family it derives from defines them (a user's subclass of Normal
    overriding ``log_prob`` does not): vaeeval may then compute them from the family's parameters."""
    cls = type(distribution)
    family = next((c for c in cls.__mro__ if c.__module__.startswith("torch.distributions")), Distribution)
    return all(getattr(cls, method, None) is getattr(family, method, None) for method in methods)


def faithful(distribution: Distribution, *methods: str) -> bool:
    """``own``, for the distribution and every one it wraps (Independent, TransformedDistribution, MixtureSameFamily)."""
    if not own(distribution, *methods):
        return False
    if isinstance(distribution, Independent | TransformedDistribution):
        return faithful(distribution.base_dist, *methods)
    if isinstance(distribution, MixtureSameFamily):
        return faithful(distribution.mixture_distribution, *methods) and faithful(distribution.component_distribution, *methods)
    return True


def keyed(distribution: Distribution) -> bool:
    """vaeeval can draw from it as a transform of keyed noise (see ``keyed_sample``); not a subclass drawing its own way."""
    if isinstance(distribution, SelfKeyed):
        return True
    if not own(distribution, "sample", "rsample"):
        return False
    if isinstance(distribution, Independent):
        return keyed(distribution.base_dist)
    if isinstance(distribution, TransformedDistribution):
        return keyed(distribution.base_dist)
    if isinstance(distribution, MixtureSameFamily):
        return keyed(distribution.component_distribution)
    return isinstance(distribution, Normal | MultivariateNormal | LowRankMultivariateNormal | OneHotCategorical | discrete.DRAWN)



def flows(distribution: Distribution) -> bool:
    """A normalizing flow (a ``TransformedDistribution``, possibly inside others): its ``log_prob`` may need its own draws."""
    if isinstance(distribution, Independent):
        return flows(distribution.base_dist)
    if isinstance(distribution, MixtureSameFamily):
        return flows(distribution.component_distribution)
    return isinstance(distribution, TransformedDistribution)


def noise_width(distribution: Distribution) -> int:
    """Noise numbers per draw: standard normals, or for a discrete family the uniforms they are the quantiles of."""
    if isinstance(distribution, SelfKeyed):
        return distribution.noise_width
    if isinstance(distribution, TransformedDistribution):
        return noise_width(distribution.base_dist)
    if isinstance(distribution, MixtureSameFamily):
        return noise_width(distribution.component_distribution)
    if isinstance(distribution, LowRankMultivariateNormal):
        return distribution.cov_factor.shape[-1] + distribution.event_shape[0]
    return max(1, math.prod(distribution.event_shape))


def transform(
    distribution: Distribution, normal: torch.Tensor, uniform: torch.Tensor, *, inside: bool = False,
    unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """A draw as a deterministic function of standard normal noise ``normal [*prefix, W]`` and uniforms ``[*prefix]``.

    ``prefix`` (the sample axes, then axes broadcasting against the batch shape) is
    kept: the result is ``[*prefix, *event_shape]``. ``inside``: within an
    ``Independent``, whose event axis the noise's last axis is. ``unit``: the uniforms
    whose normal quantiles ``normal`` holds, which the discrete families invert their
    cdf at (without them, the normals' cdf).
    """
    if isinstance(distribution, SelfKeyed):
        return distribution.keyed_transform(normal, unit)
    if isinstance(distribution, Independent):
        return transform(distribution.base_dist, normal, uniform, inside=True, unit=unit)
    if isinstance(distribution, discrete.DRAWN | OneHotCategorical) and unit is None:
        unit = torch.special.ndtr(normal.double())
    if isinstance(distribution, discrete.DRAWN):
        return discrete.draw(distribution, unit if inside else unit[..., 0], unit)
    if isinstance(distribution, OneHotCategorical):
        index = discrete.draw(distribution._categorical, unit[..., 0], unit)
        return torch.nn.functional.one_hot(index, distribution.event_shape[-1]).to(distribution.probs.dtype)
    if isinstance(distribution, TransformedDistribution):
        value = transform(distribution.base_dist, normal, uniform, inside=inside, unit=unit)
        for step in distribution.transforms:
            value = step(value)
        return value
    if isinstance(distribution, MixtureSameFamily):
        weights = distribution.mixture_distribution.probs  # [*batch, C]
        cumulative = weights.cumsum(-1).expand(*uniform.shape, -1).contiguous()
        component = torch.searchsorted(cumulative, uniform[..., None].contiguous()).clamp(max=weights.shape[-1] - 1)
        every = transform(distribution.component_distribution, normal[..., None, :], uniform[..., None], inside=inside,
                          unit=None if unit is None else unit[..., None, :])
        axis = uniform.dim()  # every is [*prefix, C, *event]
        index = component.reshape(*component.shape, *([1] * len(distribution.event_shape)))
        return every.gather(axis, index.expand(*every.shape[:axis], 1, *every.shape[axis + 1 :])).squeeze(axis)
    if isinstance(distribution, Normal):
        return distribution.loc + distribution.scale * (normal if inside else normal[..., 0])
    if isinstance(distribution, MultivariateNormal):
        return distribution.loc + (distribution.scale_tril @ normal[..., None]).squeeze(-1)
    if isinstance(distribution, LowRankMultivariateNormal):
        rank = distribution.cov_factor.shape[-1]
        low, diagonal = normal[..., :rank], normal[..., rank:]
        return distribution.loc + (distribution.cov_factor @ low[..., None]).squeeze(-1) + distribution.cov_diag.sqrt() * diagonal
    raise TypeError(f"cannot draw keyed samples from {type(distribution).__name__}")


def keyed_sample(distribution: Distribution, seed: int, indices: np.ndarray, first: int, last: int) -> torch.Tensor:
    """Draws ``first .. last-1`` of each point (batch axis 0 of ``distribution``), ``[S, B, *event_shape]``.

    Draw k of point i depends only on (seed, i, k). For a diagonal Normal these are
    exactly ``evaluate``'s draws (stream 0).
    """
    width = noise_width(distribution)
    counters = np.arange(first * width, last * width, dtype=np.uint64)
    units = rng.uniform(seed, indices, counters)  # rng.normal's uniforms: normal = ndtri(unit), the same bits
    normal = torch.from_numpy(numerics.ndtri(units)).reshape(len(indices), last - first, width).transpose(0, 1)
    unit = torch.from_numpy(units).reshape(len(indices), last - first, width).transpose(0, 1)
    uniform = torch.from_numpy(rng.uniform(seed, indices, np.arange(first, last, dtype=np.uint64), _MIXTURE_STREAM))
    return draw(distribution, normal, uniform.transpose(0, 1), fallback=(seed, int(indices[0]), first), unit=unit)


def draw(
    distribution: Distribution, normal: torch.Tensor, uniform: torch.Tensor, fallback: tuple[int, ...],
    unit: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[S, B, *event]`` draws from noise ``normal [S, B, W]``, ``uniform [S, B]`` and ``unit [S, B, W]`` (see
    ``transform``).

    A distribution vaeeval cannot write as a transform of noise is drawn by its own
    ``sample`` under a generator seeded by ``fallback``: reproducible for the same
    batches, not batch-independent.
    """
    like = _parameter(distribution)
    if keyed(distribution):
        return transform(distribution, normal.to(like), uniform.to(like), unit=None if unit is None else unit.to(like.device))
    key = int(rng.point_keys(fallback[0], np.asarray(fallback[1:], dtype=np.uint64))[-1]) & (2**63 - 1)
    batch = tuple(normal.shape[1:-1])
    if tuple(distribution.batch_shape) != batch:
        distribution = distribution.expand(torch.Size(batch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        return call_user(f"{describe(distribution)}.sample", distribution.sample, torch.Size((normal.shape[0],)), integers=True)


def _parameter(distribution: Distribution) -> torch.Tensor:
    """A tensor of the distribution's dtype and device."""
    for value in vars(distribution).values():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, Distribution):
            return _parameter(value)
    return torch.zeros(())


def in_float64(distribution: Distribution) -> Distribution:
    """The same distribution computing in float64, for the families vaeeval knows (their exact classes: a user's
    subclass is used as it is, its own ``log_prob`` and all); others as they are."""
    if type(distribution) is Independent:
        base = in_float64(distribution.base_dist)
        return distribution if base is distribution.base_dist else Independent(base, distribution.reinterpreted_batch_ndims)
    if type(distribution) is Normal:
        return Normal(distribution.loc.double(), distribution.scale.double(), validate_args=False)
    if type(distribution) is MultivariateNormal:
        return MultivariateNormal(distribution.loc.double(), scale_tril=distribution.scale_tril.double(), validate_args=False)
    if type(distribution) is LowRankMultivariateNormal:
        return LowRankMultivariateNormal(
            distribution.loc.double(), distribution.cov_factor.double(), distribution.cov_diag.double(), validate_args=False
        )
    if type(distribution) in (Bernoulli, Categorical, OneHotCategorical):  # the parameter it was given, as given
        given = discrete.given(distribution)
        return type(distribution)(**{given: getattr(distribution, given).double()}, validate_args=False)
    if type(distribution) is MixtureSameFamily and type(distribution.mixture_distribution) is Categorical:
        components = in_float64(distribution.component_distribution)
        if components is distribution.component_distribution:
            return distribution
        mixing = Categorical(logits=distribution.mixture_distribution.logits.double(), validate_args=False)
        return MixtureSameFamily(mixing, components, validate_args=False)
    return distribution


def first_rows(distribution: Distribution, rows: int) -> Distribution | None:
    """The distribution of the first ``rows`` points (batch axis 0), for the families vaeeval knows (their exact
    classes); else None."""
    if isinstance(distribution, SelfKeyed):
        return distribution.first_rows(rows)
    if type(distribution) is Independent:
        base = first_rows(distribution.base_dist, rows)
        return None if base is None else Independent(base, distribution.reinterpreted_batch_ndims)
    if type(distribution) is Normal:
        return Normal(distribution.loc[:rows], distribution.scale[:rows], validate_args=False)
    if type(distribution) in (Bernoulli, Categorical, OneHotCategorical):
        given = discrete.given(distribution)
        return type(distribution)(**{given: getattr(distribution, given)[:rows]}, validate_args=False)
    if type(distribution) in (RelaxedBernoulli, RelaxedOneHotCategorical):
        return type(distribution)(distribution.temperature, logits=distribution.logits[:rows], validate_args=False)
    if type(distribution) is MultivariateNormal:
        return MultivariateNormal(distribution.loc[:rows], scale_tril=distribution.scale_tril[:rows], validate_args=False)
    if type(distribution) is LowRankMultivariateNormal:
        return LowRankMultivariateNormal(
            distribution.loc[:rows], distribution.cov_factor[:rows], distribution.cov_diag[:rows], validate_args=False
        )
    if type(distribution) is MixtureSameFamily and type(distribution.mixture_distribution) is Categorical:
        components = first_rows(distribution.component_distribution, rows)
        if components is None:
            return None
        mixing = Categorical(logits=distribution.mixture_distribution.logits[:rows], validate_args=False)
        return MixtureSameFamily(mixing, components, validate_args=False)
    return None


def log_prob64(distribution: Distribution, z: torch.Tensor) -> torch.Tensor:
    """``distribution.log_prob(z)`` in float64, ``z`` given in the distribution's own dtype (differentiable)."""
    dtype = _parameter(distribution).dtype
    z = z if z.dtype == dtype else z.to(dtype)

    def per_element(part: Distribution) -> torch.Tensor:
        found = discrete.log_prob(part, z)
        return part.log_prob(z) if found is None else found

    total = _summed(distribution, per_element, z).double()
    return checked_total(distribution, total, math.prod(distribution.event_shape), "log_prob")


def _summed(
    distribution: Distribution, per_element: Callable[[Distribution], torch.Tensor], value: torch.Tensor | None = None
) -> torch.Tensor:
    """``per_element`` of an ``Independent``'s base distribution summed over its reinterpreted axes by a fixed tree
    (torch's own sum there changes its last bits with the batch shape); of any other distribution as it is.

    With ``value``, what ``per_element`` gives is checked to be one number per value (the sample and batch
    axes): a ``log_prob`` that leaves some of its event unsummed, or sums too much, is refused (``ValueError``),
    not summed into a wrong number.
    """
    if isinstance(distribution, Independent) and own(distribution, "log_prob"):  # not a subclass with its own
        return _tree_sum_last(_summed(distribution.base_dist, per_element, value), distribution.reinterpreted_batch_ndims)
    found = log_probabilities(per_element(distribution))
    if value is not None:
        events = len(distribution.event_shape)
        expected = torch.broadcast_shapes(value.shape[: value.dim() - events], distribution.batch_shape)
        if tuple(found.shape) != tuple(expected):
            raise Refused(
                f"{type(distribution).__name__}.log_prob gives {list(found.shape)} for values of shape {list(value.shape)}; "
                f"a distribution of batch shape {list(distribution.batch_shape)} and event shape "
                f"{list(distribution.event_shape)} gives one number per value, {list(expected)}"
            )
    return found


def _tree_sum_last(terms: torch.Tensor, axes: int) -> torch.Tensor:
    """The sum over the last ``axes`` axes, by a fixed tree."""
    return numerics.tree_sum(terms.reshape(*terms.shape[: terms.dim() - axes], -1))


def analytic_kl(posterior: Distribution, prior: Distribution) -> torch.Tensor | None:
    """KL(posterior || prior) per point when torch has the pair in closed form, else None (then sampled).

    The prior is broadcast to the posterior's batch first (a ``prior()`` has batch ``[]``,
    which not every closed form of torch's accepts). A closed form that fails for any
    reason (unregistered, a shape it mishandles, a value it cannot take) is no closed form; nor is torch's
    closed form for a user's subclass with its own ``log_prob``, which the closed form would leave out.
    """
    if not (faithful(posterior, "log_prob") and faithful(prior, "log_prob")):
        return None
    try:
        if tuple(prior.batch_shape) != tuple(posterior.batch_shape):
            prior = prior.expand(posterior.batch_shape)
        found = _independent_kl(posterior, prior)
    except Exception:  # torch's registered closed forms raise NotImplementedError, IndexError, RuntimeError, ...
        return None
    return found if tuple(found.shape) == tuple(posterior.batch_shape) else None


def _independent_kl(posterior: Distribution, prior: Distribution) -> torch.Tensor:
    """``kl_divergence``, the terms of two ``Independent``s over the same axes summed by a fixed tree (``_summed``)."""
    if (
        isinstance(posterior, Independent) and isinstance(prior, Independent)
        and posterior.reinterpreted_batch_ndims == prior.reinterpreted_batch_ndims
    ):
        terms = _independent_kl(posterior.base_dist, prior.base_dist)
        return _tree_sum_last(terms, posterior.reinterpreted_batch_ndims)
    found = discrete.kl(posterior, prior)
    return kl_divergence(posterior, prior) if found is None else found


def measure_of(distribution: Distribution) -> str:
    """``probability`` for a discrete support (Bernoulli, Poisson, ...), else ``density``."""
    return PROBABILITY if distribution.support.is_discrete else DENSITY


def moments(posterior: Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The posterior's mean and per-dimension variance ``[B, L]``, where torch defines them (as real floating
    tensors of that shape: a subclass's own that are not are drawn instead)."""
    try:
        found = posterior.mean, posterior.variance
    except Exception:  # NotImplementedError, or any failure of a user's property: the moments are then from the draws
        return None
    shape = (*posterior.batch_shape, *posterior.event_shape)
    for value in found:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.is_meta:
            return None
        try:
            if tuple(torch.broadcast_shapes(value.shape, shape)) != shape:
                return None
        except RuntimeError:
            return None
    return found


def log_prob_of(distribution: Distribution, x: torch.Tensor, bins: Grid | None = None) -> torch.Tensor:
    """log p(x|z) of each row, summed over a data point in float64, ``[N]``.

    Args:
        distribution: p(x|z) for N draws: batch and event shape ``[N, ...]`` holding one
            data point per row (any arrangement of its D values).
        x: ``[N, *input_shape]`` the data of each row.
        bins: score a continuous distribution as the probability of each value's bin on
            this grid, through its ``cdf`` (the outermost bins open).

    Raises:
        ValueError: a distribution that does not hold one data point per row.
        NotImplementedError: binned scoring of a distribution without a ``cdf``.
    """
    shape = (*distribution.batch_shape, *distribution.event_shape)
    rows = x.shape[0]
    if tuple(x.shape) != shape:
        if not shape or shape[0] != rows or math.prod(shape[1:]) != math.prod(x.shape[1:]):
            raise Refused(
                f"is a distribution of shape {list(shape)} for {rows} latent vectors of data points of shape "
                f"{list(x.shape[1:])}; it needs one data point per latent vector"
            )
        x = x.reshape(shape)
    if bins is None or distribution.support.is_discrete:
        terms = _summed(distribution, lambda part: _log_prob_of_part(part, x), x)
    elif _over_vectors(distribution.support):
        raise Refused(
            f"is a density over whole vectors ({distribution.support}), which has no bin per value to score the discrete "
            "data on: pass --density to score its density"
        )
    else:
        terms = _log_bin(distribution, x, bins)
    return terms.reshape(rows, -1).sum(-1, dtype=torch.float64)


def _over_vectors(support: constraints.Constraint) -> bool:
    """A support that constrains whole vectors (a Dirichlet's simplex), not each value."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support.event_dim > 0


def _log_prob_of_part(distribution: Distribution, x: torch.Tensor) -> torch.Tensor:
    """log p(x) per element: in float64 with fixed bits for a Bernoulli or a Categorical, else the distribution's own."""
    found = discrete.log_prob(distribution, x)
    return distribution.log_prob(x) if found is None else found


def _log_bin(distribution: Distribution, x: torch.Tensor, bins: Grid) -> torch.Tensor:
    """log P(bin of x) per dimension in float64; the outermost bins reach the ends of the support.

    Normal and Laplace (also inside ``Independent``, and as the components of a
    ``MixtureSameFamily``, whose bin is the log-sum-exp over components of log weight plus
    log P(bin)) go through format 1's formula: standardized float64 edges, the bin mirrored
    into the lower tail, log-CDFs, so a value far in either tail gets its true probability.
    Any other distribution's bins come from its own ``cdf`` at float64 edges where that
    resolves them, else from its density integrated over the bin (``quadrature``), so
    they too are right in both tails, whatever the cdf's dtype.
    """
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    x = x.double()
    exact = _exact_log_bin(distribution, x, bins)
    if exact is not None:
        return exact
    lower, upper = bin_edges(x, bins, -math.inf, math.inf)
    return log_bin_from_cdf(distribution, x, lower, upper, bins.step)


_STANDARD_LOG_CDF = {Normal: GaussianLikelihood.standard_log_cdf, Laplace: LaplaceLikelihood.standard_log_cdf}


def _exact_log_bin(distribution: Distribution, x: torch.Tensor, bins: Grid) -> torch.Tensor | None:
    """log P(bin) by the tail-mirrored formula, for the families it covers (their exact classes: a subclass
    may define its own ``cdf``); None for any other distribution."""
    if type(distribution) is MixtureSameFamily:
        components = distribution.component_distribution
        if isinstance(components, Independent):
            return None  # components over whole vectors: their bins are not per value
        each = _exact_log_bin(components, x.unsqueeze(-1), bins)
        if each is None:
            return None
        weights = numerics.log_softmax(distribution.mixture_distribution.logits.double())
        return numerics.logsumexp(weights + each, dim=-1)
    log_cdf = _STANDARD_LOG_CDF.get(type(distribution))
    if log_cdf is None:
        return None
    location, scale = distribution.loc.double(), distribution.scale.double()
    lower, upper, open_low, open_high = finite_edges(*bin_edges(x.expand_as(location), bins, -math.inf, math.inf))
    return log_symmetric_bin(log_cdf, (lower - location) / scale, (upper - location) / scale, open_low, open_high)
