"""Discrete latents: keyed draws, log-probabilities and KLs with fixed bits, and the finite support to sum over.

A latent z drawn from a Bernoulli, a Categorical or a OneHotCategorical (or an
``Independent`` of them) is drawn by inverting its cdf at vaeeval's keyed uniforms
(``draw``), so that sample k of point i depends on (seed, i, k) only; the relaxed
families (``RelaxedBernoulli``, ``RelaxedOneHotCategorical``, which torch writes as
transforms of ``LogitRelaxedBernoulli`` and ``ExpRelaxedCategorical``) from the logistic
and Gumbel noise of those uniforms. Their log-probabilities and their KLs are computed
here with ``core.numerics`` (torch's use vectorized softplus, log1p and sums whose last
bits change with a value's position in the batch). ``support_size`` and ``support_values``
list a finite latent's values, in chunks, for exact enumeration of log p(x).
"""

from __future__ import annotations

import math

import torch
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    OneHotCategorical,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
)
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from vaeeval.core import numerics

DRAWN = Bernoulli | Categorical | LogitRelaxedBernoulli | ExpRelaxedCategorical  # by ``draw`` (OneHot via its Categorical)


def draw(distribution: Distribution, u: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """A draw of a ``DRAWN`` family from uniforms ``u`` (one per scalar draw, broadcasting against its batch), or
    ``unit [*prefix, K]`` for the K Gumbel numbers of an ``ExpRelaxedCategorical``.

    Bernoulli: u < p. Categorical: the first category whose cumulative probability reaches u
    (normalized to end at 1 exactly, so a category of probability 0 is never drawn).
    LogitRelaxedBernoulli: (logit u + logits) / temperature. ExpRelaxedCategorical: the
    log-softmax of (logits + Gumbel) / temperature, Gumbel = -log(-log u) (Maddison et al. 2017).
    """
    u = u.double()
    if isinstance(distribution, Bernoulli):
        return (u < distribution.probs.double()).to(distribution.probs.dtype)
    if isinstance(distribution, Categorical):
        cumulative = distribution.probs.double().cumsum(-1)
        cumulative = (cumulative / cumulative[..., -1:]).expand(*u.shape, -1).contiguous()
        return torch.searchsorted(cumulative, u[..., None].contiguous()).squeeze(-1)
    if isinstance(distribution, LogitRelaxedBernoulli):
        logistic = torch.log(u) - torch.log(1 - u)
        return ((logistic + distribution.logits.double()) / distribution.temperature).to(distribution.logits.dtype)
    gumbel = -torch.log(-torch.log(unit.double()))
    scores = (distribution.logits.double() + gumbel) / distribution.temperature
    return (scores - numerics.logsumexp(scores, dim=-1)[..., None]).to(distribution.logits.dtype)


def given(distribution: Bernoulli | Categorical | OneHotCategorical) -> str:
    """``probs`` or ``logits``: the parameter the distribution was built from."""
    return "probs" if distribution._param is vars(distribution).get("probs") else "logits"


def _bernoulli_logs(distribution: Bernoulli) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log (1 - p)) in float64, from the parameter it was given."""
    if given(distribution) == "probs":
        p = distribution.probs.double()
        return numerics.log(p), numerics.log1p(-p, numerics.log)
    logits = distribution.logits.double()
    return -numerics.softplus(-logits), -numerics.softplus(logits)


def _categorical_logs(distribution: Categorical | OneHotCategorical) -> torch.Tensor:
    """log p of each category ``[*batch, K]`` in float64, normalized."""
    if given(distribution) == "probs":
        p = distribution.probs.double()
        return numerics.log(p / numerics.tree_sum(p)[..., None])
    return numerics.log_softmax(distribution.logits.double())


def log_prob(distribution: Distribution, z: torch.Tensor) -> torch.Tensor | None:
    """log p(z) in float64 of a Bernoulli, Categorical or OneHotCategorical (with fixed bits); None for others."""
    if type(distribution) is Bernoulli:
        log_p, log_not_p = _bernoulli_logs(distribution)
        return torch.where(z.double() > 0.5, log_p, log_not_p)
    if type(distribution) in (Categorical, OneHotCategorical):
        logs = _categorical_logs(distribution)
        index = z.argmax(-1) if type(distribution) is OneHotCategorical else z.long()
        index = index[..., None]
        logs = logs.expand(*torch.broadcast_shapes(index.shape[:-1], logs.shape[:-1]), logs.shape[-1])
        return logs.gather(-1, index.expand(*logs.shape[:-1], 1)).squeeze(-1)
    if type(distribution) in (RelaxedBernoulli, RelaxedOneHotCategorical):
        return _relaxed_log_prob(distribution, z.double())
    return None


def _relaxed_log_prob(distribution: RelaxedBernoulli | RelaxedOneHotCategorical, y: torch.Tensor) -> torch.Tensor:
    """The density of a relaxed draw ``y`` in float64: its logit (or log) x's density less log |dy/dx|.

    RelaxedBernoulli: x = logit y, log p(x) = log t + d - 2 softplus(d) with d = logits - t x, and
    log |dy/dx| = -softplus(-x) - softplus(x). RelaxedOneHotCategorical: x = log y, log p(x) =
    lgamma(K) + (K - 1) log t + sum_k (s_k - logsumexp s) with s = logits - t x (Maddison et al. 2017),
    and log |dy/dx| = sum_k x_k.
    """
    t = distribution.temperature.double()
    if isinstance(distribution, RelaxedBernoulli):
        x = numerics.log(y) - numerics.log(1 - y)
        d = distribution.logits.double() - t * x
        return numerics.log(t) + d - 2 * numerics.softplus(d) + numerics.softplus(-x) + numerics.softplus(x)
    x = numerics.log(y)
    k = y.shape[-1]
    scores = numerics.log_softmax(distribution.logits.double()) - t * x
    normalized = numerics.tree_sum(scores - numerics.logsumexp(scores, dim=-1)[..., None])
    return math.lgamma(k) + (k - 1) * numerics.log(t) + normalized - numerics.tree_sum(x)


def kl(posterior: Distribution, prior: Distribution) -> torch.Tensor | None:
    """KL(posterior || prior) in float64 of two Bernoullis or two Categoricals (one-hot or not); None for others.

    Terms where the posterior's probability is 0 are 0; where only the prior's is, +inf.
    """
    if type(posterior) is Bernoulli and type(prior) is Bernoulli:
        (log_p, log_not_p), (log_q, log_not_q) = _bernoulli_logs(posterior), _bernoulli_logs(prior)
        p = numerics.exp(log_p)
        return _weighted(p, log_p - log_q) + _weighted(1 - p, log_not_p - log_not_q)
    pair = {type(posterior), type(prior)}
    if pair in ({Categorical}, {OneHotCategorical}):
        log_p, log_q = _categorical_logs(posterior), _categorical_logs(prior)
        return numerics.tree_sum(_weighted(numerics.exp(log_p), log_p - log_q))
    return None


def _weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight x value, 0 where the weight is 0 (whatever the value)."""
    return torch.where(weight > 0, weight * value, 0.0)


def point_mass(distribution: Distribution) -> bool:
    """Every draw is the same value: a Bernoulli, Categorical or OneHotCategorical (or an ``Independent`` of them)
    whose probabilities are all 0 or 1, as a VQ-VAE's deterministic encoder gives."""
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    if type(distribution) not in (Bernoulli, Categorical, OneHotCategorical):
        return False
    probs = distribution.probs
    return bool(((probs == 0) | (probs == 1)).all())


# ---------------------------------------------------------------- enumeration


def family_of(posterior: Distribution) -> str | None:
    """``categorical`` for a ``OneHotCategorical`` z, ``bernoulli`` for binary units (``Independent`` of a
    ``Bernoulli``), the latents whose mutual information with x latent health computes exactly; else None."""
    if type(posterior) is OneHotCategorical:
        return "categorical"
    base = posterior
    while isinstance(base, Independent):
        base = base.base_dist
    return "bernoulli" if type(base) is Bernoulli and len(posterior.event_shape) == 1 else None


def support_size(distribution: Distribution) -> int | None:
    """How many values a latent vector can take: K for a (one-hot) categorical, 2**d for d Bernoullis, K**d for
    d categoricals; None where the support is not finite or vaeeval cannot list it."""
    factors = _factors(distribution)
    return None if factors is None else math.prod(factors)


def _factors(distribution: Distribution) -> list[int] | None:
    """The number of values of each coordinate of z, or None."""
    if isinstance(distribution, OneHotCategorical):
        return [distribution.event_shape[-1]] if len(distribution.event_shape) == 1 else None
    inner = distribution.base_dist if isinstance(distribution, Independent) else distribution
    if isinstance(distribution, Independent) and distribution.reinterpreted_batch_ndims != 1:
        return None
    shape = tuple(distribution.event_shape)
    if len(shape) != 1 or not isinstance(inner, Bernoulli | Categorical):
        return None
    return [2 if isinstance(inner, Bernoulli) else inner.probs.shape[-1]] * shape[0]


def support_values(distribution: Distribution, start: int, stop: int) -> torch.Tensor:
    """Values ``start .. stop - 1`` of the support, in a fixed order, ``[stop - start, *event_shape]`` float64.

    Value number n is read as a number in mixed radix (the first coordinate the most
    significant), so any chunk of the support is made without listing the rest.
    """
    numbers = torch.arange(start, stop, dtype=torch.int64)
    if isinstance(distribution, OneHotCategorical):
        return torch.nn.functional.one_hot(numbers, distribution.event_shape[-1]).double()
    factors = _factors(distribution)
    digits = []
    for radix in reversed(factors):
        digits.append(numbers % radix)
        numbers = numbers // radix
    return torch.stack(digits[::-1], dim=-1).double()
