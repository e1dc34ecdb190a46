"""A user's VAE that speaks torch.distributions, as a model vaeeval evaluates.

With ``--arch``, ``encode(x, **c)`` may return any ``torch.distributions.Distribution``
over z (a full-covariance Normal, a normalizing flow, a mixture), ``decode(z, **c)`` a
distribution over x (Bernoulli, Poisson, NegativeBinomial, ContinuousBernoulli, the
user's own), and ``prior()`` p(z). ``ArchModel`` holds such a model; the evaluation loop
takes its general path for it (``Model.general``): keyed draws from q(z|x)
(``distributions.keyed_sample``), log q and log p(z) from the distributions, log p(x|z)
from the decoder's distribution (or the format-1 likelihood of its parameters), the KL
in closed form where torch registers the pair, else from the draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution, Independent, Laplace, Normal, constraints

from vaeeval.errors import VaeevalError
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods import GaussianLikelihood, LaplaceLikelihood, Likelihood
from vaeeval.format.model import MIN_ROWS, Model
from vaeeval.format.priors import Prior
from vaeeval.format.terms import ANALYTIC, MONTE_CARLO
from vaeeval.user.calls import call_user
from vaeeval.user.checks import checked_total, drawable
from vaeeval.user.distributions import (
    analytic_kl,
    describe,
    draw,
    first_rows,
    in_float64,
    keyed,
    log_prob64,
    log_prob_of,
    measure_of,
    noise_width,
)
from vaeeval.user.sequences import DATA, LENGTHS, masked_log_prob


class DistributionPrior(Prior):
    """p(z) as a torch distribution: what the model's ``prior()`` returns (a learned Gaussian, a mixture, a
    VampPrior, a flow), or the standard normal assumed for a model without one.

    Args:
        distribution: p(z), batch shape ``[]`` and event shape ``[latent_dim]``.
        probe: a q(z|x) of the model, to learn whether torch has the KL in closed form.
        source: where p(z) comes from, as the output says it.
    """

    family = "prior()"

    def __init__(self, distribution: Distribution, latent_dim: int, probe: Distribution, source: str = "prior()") -> None:
        super().__init__({"family": self.family, "distribution": describe(distribution), "source": source}, latent_dim)
        drawable("prior()", distribution, draws=False)
        self.prior = in_float64(distribution)
        self.kl_kind = ANALYTIC if analytic_kl(in_float64(probe), self.prior) is not None else MONTE_CARLO

    @property
    def noise_width(self) -> int:
        return noise_width(self.prior)

    def distribution(self, like: torch.Tensor) -> Distribution:
        return self.prior

    def kl(self, q: Distribution) -> torch.Tensor | None:
        return analytic_kl(in_float64(q), self.prior) if self.kl_kind == ANALYTIC else None

    def marginals(self, like: torch.Tensor) -> Normal | None:
        base = self.prior.base_dist if isinstance(self.prior, Independent) else None
        return base if type(base) is Normal and self.prior.reinterpreted_batch_ndims == 1 else None

    def sample(self, normal: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        return draw(self.prior, normal, uniform, fallback=(0, int(uniform.flatten()[0].item() * 2**53)))

    def to(self, device: torch.device | str) -> Prior:
        return self


def standard_normal(latent_dim: int, probe: Distribution) -> DistributionPrior:
    """N(0, I), assumed for a model that defines no ``prior()``: the output says so."""
    zeros = torch.zeros(latent_dim, dtype=torch.float64)
    prior = DistributionPrior(Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1), latent_dim, probe, ASSUMED)
    prior.family = prior.spec["family"] = "standard_normal"  # type: ignore[misc]
    return prior


ASSUMED = "N(0, I) assumed: the model defines no prior()"


def describe_support(support: constraints.Constraint) -> str:
    """A torch constraint in words: ``non-negative integers``, ``values 0 or 1``, ``values in [0, 1]``."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    low, high = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
    if support is constraints.boolean:
        return "values 0 or 1"
    if support is constraints.simplex:
        return "points of the probability simplex (values of at least 0 summing to 1 within 1e-6)"
    if support.is_discrete:
        if low is not None and high is not None:
            return f"integers from {low} to {high}"
        if low is not None:
            return "non-negative integers" if low == 0 else f"integers of at least {low}"
        return "integers"
    if low is not None and high is not None:
        return f"values in [{low}, {high}]"
    if low is not None:
        return f"values above {low}"
    return "finite real values" if support is constraints.real else str(support)


class DistributionLikelihood(Likelihood):
    """p(x|z) as the model's ``decode`` returns it: a torch distribution over one data point per row.

    Its support decides the measure: a discrete one (Bernoulli, Poisson, ...) gives
    probabilities, a continuous one densities, scored on the data's bins through its
    ``cdf`` when the data is discrete (``binnable``: it has one).

    Args:
        probe: what ``decode`` returned for two latent vectors.
        input_shape: the shape of one data point.
        method: the decoding method's name, for messages.
    """

    family = "decode()"

    def __init__(self, probe: Distribution, input_shape: tuple[int, ...], method: str) -> None:
        name = describe(probe)
        spec = {"family": self.family, "distribution": name}
        if location_scale_family(name):  # --explain writes its recon out as that family's, with the decoder's own scale
            spec["decode_family"] = location_scale_family(name)
        super().__init__(spec, input_shape, 1)
        shape = (*probe.batch_shape, *probe.event_shape)
        if not shape or shape[0] != 2 or math.prod(shape[1:]) != math.prod(input_shape):
            raise VaeevalError(
                f"{method}(z) returned {name} of shape {list(shape)} for 2 latent vectors; vaeeval needs one data point "
                f"({math.prod(input_shape)} values) per latent vector"
            )
        drawable(f"{method}(z)", probe, draws=False)
        self.measure = measure_of(probe)  # type: ignore[misc]
        self.support = f"{describe_support(probe.support)} (the support of its {name})"  # type: ignore[misc]
        support = probe.support
        while isinstance(support, constraints.independent):
            support = support.base_constraint
        self.base_constraint = support
        self.point_shape = shape[1:]  # one data point as the distribution holds it: a simplex is over its last axis
        self.binnable = self.continuous and _has_cdf(probe)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        """Each value outside the support; of a support over whole vectors (a Dirichlet's simplex), each value of
        a vector outside it."""
        values = torch.as_tensor(np.asarray(x, dtype=np.float64)).reshape(np.shape(x)[0], *self.point_shape)
        try:
            inside = self.base_constraint.check(values)
            inside = inside.reshape(*inside.shape, *[1] * (values.dim() - inside.dim())).expand(values.shape)
        except (NotImplementedError, RuntimeError, TypeError):
            return np.zeros(np.shape(x), dtype=bool)
        return ~inside.reshape(np.shape(x)).numpy()

    def verification_points(self, generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        raise VaeevalError("decode() returns a distribution, which format 1 cannot hold")


def _has_cdf(distribution: Distribution) -> bool:
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    try:
        distribution.cdf(distribution.mean)
    except Exception:  # NotImplementedError, or any failure of the probe: binned scoring would fail the same way
        return False
    return True


@dataclass(frozen=True)
class ArchModel(Model):
    """A model read through the ``--arch`` protocol, with its distributions.

    ``general`` (see ``Model``) is true when the fast format-1 path cannot evaluate it: a
    posterior that is not a diagonal Normal, a decoder giving a distribution, a ``prior()``,
    or covariates.

    Attributes:
        posterior_of: ``(x, covariates)`` -> q(z|x), batch ``[B]``, event ``[latent_dim]``.
        decode_of: ``(z, covariates)`` -> a distribution over x, or format-1 parameters ``[N, P*D]``.
        discrete_latent: ``q(z|x) OneHotCategorical``, say, when z is discrete; None for a continuous z.
        covariates (``Model``'s): the names ``encode`` and ``decode`` take them by.
    """

    posterior_of: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], Distribution] | None = None
    decode_of: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], Any] | None = None
    discrete_latent: str | None = None  # which of q(z|x) and p(z) has a discrete support, in words (see ``discreteness``)
    discrete_posterior: bool = False  # q(z|x) has a discrete support
    discrete_family: str | None = None  # categorical (one-hot z) or bernoulli (binary units): ``discrete.family_of``
    point_mass: bool = False  # q(z|x) of the probe points has probability 1 on one z (a VQ-VAE's), see ``discrete.point_mass``
    positions: int | None = None  # T, with --lengths: the data are padded sequences of T positions (``user.sequences``)
    teacher_forced: bool = False  # decode(z, x) is given each row's data point
    latent_groups: tuple[str, ...] = ()  # a hierarchical latent's groups in the flat z's order (user/hierarchy.py)

    def posterior(self, x: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> Distribution:
        """q(z|x), batch ``[B]`` and event ``[latent_dim]``.

        Fewer than ``MIN_ROWS`` points are padded (see ``log_likelihood``) where vaeeval can
        take the distribution of the first rows back out.
        """
        covariates = dict(covariates or {})
        rows = x.shape[0]
        if rows < MIN_ROWS:
            padded = self.posterior_of(_padded(x), {k: _padded(v) for k, v in covariates.items()})
            taken = first_rows(padded, rows)
            if taken is not None:
                return taken
        return self.posterior_of(x, covariates)

    def decode_any(self, z: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> Distribution | torch.Tensor:
        """p(x|z) for ``z [N, latent_dim]``: a distribution, or the format-1 parameters ``[N, P, *input_shape]``."""
        output = self.decode_of(z, covariates or {})
        if isinstance(output, Distribution):
            return output
        return output.reshape(z.shape[0], *self.decode_shape)

    def log_likelihood(
        self, z: torch.Tensor, x: torch.Tensor, covariates: Mapping[str, torch.Tensor], bins: Grid | None
    ) -> torch.Tensor:
        """log p(x|z) ``[N]`` float64 of rows ``z [N, L]`` float32 with their data ``x [N, *input_shape]``.

        Fewer than ``MIN_ROWS`` rows are padded (with copies of the first), so a row's
        number does not depend on how many came with it.
        """
        output, x, rows, lengths = self.decode_rows(z, x, covariates)
        if isinstance(output, Distribution):
            method = self.decoder.method
            try:
                total = call_user(f"{method}(z)'s {describe(output)}", _log_prob, output, x, lengths, bins)
            except ValueError as error:
                raise VaeevalError(f"{method}(z) {error}") from None
        else:
            total = self.likelihood.log_prob(output, x, bins)
        return total[:rows]

    def decode_rows(
        self, z: torch.Tensor, x: torch.Tensor, covariates: Mapping[str, torch.Tensor]
    ) -> tuple[Distribution | torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """What ``decode`` gives for rows ``z [N, L]`` float32 as ``log_likelihood`` calls it (padded to ``MIN_ROWS``
        with copies of the first row; a teacher-forced decode given each row's data), the data of each of those rows,
        N (the first N rows are z's), and each row's sequence length where ``--lengths`` gave them."""
        rows = z.shape[0]
        if rows < MIN_ROWS:
            z, x, covariates = _padded(z), _padded(x), {k: _padded(v) for k, v in covariates.items()}
        lengths = covariates.get(LENGTHS) if self.positions is not None else None
        output = self.decode_any(z, {**covariates, DATA: x} if self.teacher_forced else covariates)
        return output, x, rows, lengths

    def user_log_prob(self, what: str, distribution: Distribution, z: torch.Tensor) -> torch.Tensor:
        """``distribution.log_prob(z)`` in float64; a failure of the user's distribution is one error naming it."""
        return call_user(f"{what}'s {describe(distribution)}", log_prob64, distribution, z)


def _log_prob(distribution: Distribution, x: torch.Tensor, lengths: torch.Tensor | None, bins: Grid | None) -> torch.Tensor:
    """log p(x|z) ``[N]``: over the positions before each length where there are lengths and the terms split by
    position (``masked_log_prob``), else over the whole point (``log_prob_of``)."""
    found = None if lengths is None else masked_log_prob(distribution, x, lengths, bins)
    found = log_prob_of(distribution, x, bins) if found is None else found
    return checked_total(distribution, found, math.prod(x.shape[1:]), "log p(x|z)")


def _padded(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` followed by copies of its first row, ``MIN_ROWS`` in all."""
    return torch.cat([rows, rows[:1].expand(MIN_ROWS - rows.shape[0], *rows.shape[1:])])


def as_posterior(output: Any, method: str, rows: int) -> Distribution:
    """What ``encode`` returned, as q(z|x) with batch ``[rows]`` and event ``[latent_dim]``.

    Raises:
        VaeevalError: neither ``(mean, log_var)`` nor a distribution of that shape.
    """
    if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output):
        mean, log_var = output
        if mean.shape != log_var.shape or mean.dim() != 2:
            raise VaeevalError(f"{method}(x) returned a mean of {list(mean.shape)} and a log-variance of {list(log_var.shape)}")
        output = Independent(Normal(mean.double(), (0.5 * log_var.double()).exp(), validate_args=False), 1)
    if isinstance(output, Normal) and output.loc.dim() == 2:
        output = Independent(output, 1)
    if not isinstance(output, Distribution):
        raise VaeevalError(f"{method}(x) returned a {type(output).__name__}; vaeeval needs (mean, log_var) or a distribution")
    drawable(f"{method}(x)", output, draws=not keyed(output))
    if tuple(output.batch_shape) != (rows,) or len(output.event_shape) != 1:
        raise VaeevalError(
            f"{method}(x) returned {describe(output)} with batch shape {list(output.batch_shape)} and event shape "
            f"{list(output.event_shape)} for {rows} points; vaeeval needs batch [{rows}] and event [latent_dim]"
        )
    return output


def diagonal(posterior: Distribution) -> bool:
    """A diagonal Normal (torch's own, not a subclass with its own log_prob): the fast format-1 path evaluates it."""
    return type(posterior) is Independent and type(posterior.base_dist) is Normal and posterior.reinterpreted_batch_ndims == 1


def discreteness(posterior: Distribution, prior: Distribution) -> str | None:
    """Which of q(z|x) and p(z) has a discrete support, in words (``q(z|x) OneHotCategorical``); None if neither."""
    found = [f"{name} {describe(d)}" for name, d in (("q(z|x)", posterior), ("p(z)", prior)) if d.support.is_discrete]
    return " and ".join(found) or None


def unkeyed_note(posterior: Distribution) -> str:
    """The note for a q(z|x) that vaeeval can only draw from by its own ``sample``."""
    return (
        f"q(z|x) is {describe(posterior)}, drawn by its own sample() under a generator seeded per batch: its numbers "
        "depend on --batch-size (vaeeval draws Normal, MultivariateNormal, flows, mixtures, Bernoulli, Categorical, "
        "OneHotCategorical and the relaxed families from keyed noise instead)"
    )


_LOCATION_SCALE = {Normal: GaussianLikelihood, Laplace: LaplaceLikelihood}


def location_scale_family(name: str) -> str | None:
    """The format-1 family of a ``decode()`` distribution as ``describe`` names it (``Independent(Normal)``), or None."""
    while name.startswith("Independent(") and name.endswith(")"):
        name = name[len("Independent(") : -1]
    return {"Normal": GaussianLikelihood.family, "Laplace": LaplaceLikelihood.family}.get(name)


def location_scale_likelihood(distribution: Distribution, input_shape: tuple[int, ...]) -> tuple[Likelihood, torch.Tensor]:
    """A ``decode()`` Normal or Laplace over N rows as format 1's family with the decoder's own scale, and its parameters
    ``[N, 2, *input_shape]`` (location, log-scale), for ``--explain``'s statistics."""
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    family = _LOCATION_SCALE[type(distribution)]
    rows = distribution.batch_shape[0]
    location, scale = (t.expand(distribution.batch_shape).reshape(rows, *input_shape) for t in (distribution.loc, distribution.scale))
    return family({"family": family.family}, input_shape, 2, None), torch.stack([location.double(), torch.log(scale.double())], dim=1)
