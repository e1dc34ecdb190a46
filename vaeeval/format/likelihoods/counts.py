"""Count families (FORMAT.md, "Count data"): Poisson, negative binomial and zero-inflated negative binomial.

The parameterization is scVI's: a mean mu and, for the negative binomial, an inverse
dispersion theta (variance mu + mu^2 / theta), both given as logs; the zero-inflated one
adds the logits of the probability pi of an extra zero. With m = log mu and t = log theta,

    log NB(x; mu, theta) = x (m - t) - (theta + x) softplus(m - t)
                           + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1),

which is theta log(theta / (theta + mu)) + x log(mu / (theta + mu)) plus the log binomial
coefficient (softplus(-d) = softplus(d) - d), written so that neither theta + mu nor a
ratio of them is ever formed: it stays exact for huge counts, for theta far below 1 and
far above mu (the Poisson limit), all in float64. The lgamma terms depend on the point
alone unless theta is a decoder output, so they are computed once per point, not per
sample. With pi = sigmoid(logits) and L0 = log NB(0) = -theta softplus(m - t), a zero's
log(pi + (1 - pi) NB(0)) is -softplus(logits) + L0 + softplus(logits - L0): no
difference of nearly equal numbers, whatever pi.

With an observed library size (``library: {"type": "observed"}``), the decoder's first
block is read as the logits of each dimension's share of the counts, and
mu = (sum of the point's counts) x softmax(logits): the number is then log p(x | library size).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from vaeeval.core import numerics
from vaeeval.core.numerics import log1p
from vaeeval.errors import SpecError, VaeevalError
from vaeeval.format.likelihoods.base import Likelihood, register
from vaeeval.format.specs import named_tensor
from vaeeval.format.terms import PROBABILITY

COUNT_FAMILIES = ("poisson", "negative_binomial", "zinb")
_NO_COUNTS = 1e-300  # a point without counts: mu ~ 1e-300, so log p(all zero | library 0) = 0 with finite terms


class _CountLikelihood(Likelihood):
    """Shared by the count families: log-mean first, an observed library, the support, the sampler's refusal."""

    measure = PROBABILITY
    support = "non-negative integers (counts)"
    theta_key: ClassVar[str | None] = None
    inflated: ClassVar[int] = 0  # 1: a last block of zero-inflation logits

    def __init__(self, spec: Mapping[str, Any], input_shape: tuple[int, ...], params_per_dim: int) -> None:
        super().__init__(spec, input_shape, params_per_dim)
        self.log_theta: torch.Tensor | None = None  # per dimension, when the file holds it
        self.observed_library = False  # set by the model's ``library`` block

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        extra = cls.inflated
        if cls.theta_key is None:
            return cls(spec, input_shape, 1)
        if cls.theta_key not in spec:
            return cls(spec, input_shape, 2 + extra)  # log theta is a decoder output
        name = spec[cls.theta_key]
        tensor = named_tensor(tensors, name, f"likelihood: {cls.theta_key}", finite=True)
        if tuple(tensor.shape) not in ((), input_shape):
            raise SpecError(f"likelihood: {cls.theta_key} tensor {name!r} is {list(tensor.shape)}, expected [] or {list(input_shape)}")
        likelihood = cls(spec, input_shape, 1 + extra)
        likelihood.log_theta = tensor
        likelihood.values = {cls.theta_key: tensor}
        return likelihood

    def log_mean(self, first: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log mu from the decoder's first block ``[..., *input_shape]`` (float64); the observed library applied."""
        if not self.observed_library:
            return first
        dims = len(self.input_shape)
        flat = first.flatten(start_dim=first.dim() - dims)
        shares = numerics.log_softmax(flat).reshape(first.shape)
        total = x.flatten(start_dim=x.dim() - dims).sum(dim=-1).clamp(min=_NO_COUNTS)
        return shares + torch.log(total).reshape(*total.shape, *([1] * dims))

    def blocks(self, params: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(log mu, log theta or None, zero-inflation logits or None), float64, from ``params [..., P, *input_shape]``."""
        parts = [part.double() for part in self.split(params)]
        log_mu = self.log_mean(parts[0], x.double())
        if self.theta_key is None:
            return log_mu, None, None
        if self.log_theta is not None:
            log_theta = self.log_theta.to(device=params.device, dtype=torch.float64)
            rest = parts[1:]
        else:
            log_theta, rest = parts[1], parts[2:]
        return log_mu, log_theta, (rest[0] if rest else None)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return (x < 0) | (x != np.floor(x))

    def verification_points(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return rng.poisson(3.0, shape).astype(np.float32)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        raise VaeevalError(f"vaeeval cannot simulate {self.family} data yet (bdmc); run vaeeval ais on data instead")

    def to(self, device):
        moved = copy.copy(self)
        if self.log_theta is not None:
            moved.log_theta = self.log_theta.to(device)
        return moved


_STIRLING_FROM = 1e4  # theta above which lgamma(x + theta) - lgamma(theta) is taken from Stirling's series


def log_rising(theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """lgamma(x + theta) - lgamma(theta), float64, also where theta >> x (the Poisson limit).

    There the two lgammas are huge and nearly equal (for theta = 1e12 each is 2.7e13, whose
    rounding alone is 0.004), so above ``_STIRLING_FROM`` the difference is taken from
    Stirling's formula, (theta - 1/2) log1p(x / theta) + x log(theta + x) - x, plus the
    difference of the series' remainders 1/(12 n) - 1/(360 n^3) (the next term is below 1e-23).
    """
    direct = numerics.lgamma(x + theta) - numerics.lgamma(theta)
    big = theta.clamp(min=_STIRLING_FROM)
    moved = big + x

    def remainder(n: torch.Tensor) -> torch.Tensor:
        return 1 / (12 * n) - 1 / (360 * n**3)

    series = (big - 0.5) * log1p(x / big) + x * torch.log(moved) - x + remainder(moved) - remainder(big)
    return torch.where(theta >= _STIRLING_FROM, series, direct)


def log_negative_binomial(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log NB(x; mu, theta), log NB(0; mu, theta)) elementwise, float64 (module docstring)."""
    theta = log_theta.exp()
    d = log_mu - log_theta
    s = numerics.softplus(d)
    coefficient = log_rising(theta, x) - numerics.lgamma(x + 1)
    return x * d - (theta + x) * s + coefficient, -theta * s


@register
class PoissonLikelihood(_CountLikelihood):
    """Poisson(mu) per dimension; the decoder gives log mu (or, with an observed library, the logits of its share)."""

    family = "poisson"

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        log_mu, _, _ = self.blocks(params, x)
        return x * log_mu - log_mu.exp() - numerics.lgamma(x + 1)


@register
class NegativeBinomialLikelihood(_CountLikelihood):
    """NB(mu, theta) per dimension: log mu, then log theta unless the file holds it (``log_theta``)."""

    family = "negative_binomial"
    keys = frozenset({"log_theta"})
    tensor_keys = ("log_theta",)
    theta_key = "log_theta"

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        log_mu, log_theta, _ = self.blocks(params, x)
        return log_negative_binomial(x, log_mu, log_theta)[0]


@register
class ZeroInflatedNegativeBinomialLikelihood(NegativeBinomialLikelihood):
    """pi 1{x = 0} + (1 - pi) NB(mu, theta): log mu, [log theta], then the logits of pi."""

    family = "zinb"
    inflated = 1

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        log_mu, log_theta, logits = self.blocks(params, x)
        log_nb, log_zero = log_negative_binomial(x, log_mu, log_theta)
        extra = torch.where(x == 0, numerics.softplus(logits - log_zero), 0.0)  # the zero-inflation's own mass at 0
        return log_nb - numerics.softplus(logits) + extra
