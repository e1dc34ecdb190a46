"""The continuous Bernoulli p(x|z) on [0, 1] (Loaiza-Ganem & Cunningham 2019), with a stable log-normalizer."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributions import ContinuousBernoulli, Distribution
from torch.distributions.utils import broadcast_all

from vaeeval.core import numerics
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods.base import BINARY, Likelihood, bin_edges, log1mexp, register
from vaeeval.format.terms import DENSITY


class StableContinuousBernoulli(ContinuousBernoulli):
    """torch's ContinuousBernoulli whose ``log_prob`` takes its log-normalizer from the logits.

    torch computes log C from clamped probabilities, so for |logit| > ~16 in
    float32 it stops growing (0.6 nats per dimension too low at logit 30). In
    logits eta, C = eta / tanh(eta / 2), and with a = |eta|
    log C = log a - log(1 - exp(-a)) + log(1 + exp(-a)), whose pieces are stable
    for all a; below 1e-2 the series log 2 + a^2/12 - 7 a^4/1440 is used.
    ``log_prob`` is torch's own formula (minus the binary cross-entropy, plus log C)
    with that log C, written out here rather than through torch's private hook, and the
    cross-entropy as x l - softplus(l) (``numerics``: fixed bits on any ISA).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, value = broadcast_all(self.logits, value)
        return value * logits - numerics.softplus(logits) + continuous_bernoulli_log_norm(self.logits)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(eta) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), stable for any logit."""
    a = logits.abs()
    safe = a.clamp(min=1e-2)
    exact = torch.log(safe) - torch.log(-numerics.expm1(-safe)) + torch.log(1 + torch.exp(-safe))
    series = math.log(2.0) + a**2 / 12 - 7 * a**4 / 1440
    return torch.where(a < 1e-2, series, exact)


@register
class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli on [0, 1] per dimension; the decoder gives logits."""

    family = "continuous_bernoulli"
    measure = DENSITY
    support = "values in [0, 1]"
    value_range = (0.0, 1.0)
    decoder_outputs = {"logits": None, "probs": BINARY}

    def distribution(self, params: torch.Tensor) -> Distribution:
        return StableContinuousBernoulli(logits=self.split(params)[0], validate_args=False)

    def log_bin_probability(self, params: torch.Tensor, x: torch.Tensor, bins: Grid) -> torch.Tensor:
        """P([a, b]) = (e^(b eta) - e^(a eta)) / (e^eta - 1), in logs without cancellation."""
        eta = self.split(params)[0]
        a, b = bin_edges(x.expand_as(eta), bins, 0.0, 1.0)
        size = eta.abs().clamp(min=1e-300)
        exact = torch.where(eta > 0, (b - 1) * eta, a * eta) + log1mexp((b - a) * size) - log1mexp(size)
        near_zero = torch.log(b - a) + (a + b - 1) * eta / 2  # first order in eta, error O(eta^2)
        return torch.where(eta.abs() < 1e-6, near_zero, exact)

    def loss_statistics(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> dict[str, torch.Tensor]:
        """``loss`` the binary cross-entropy sum_d softplus(eta_d) - x_d eta_d and ``log_normalizer`` sum_d log C(eta_d),
        in float64 (log p(x_d|z) is their difference); on bins also ``log_density_width``."""
        eta = self.split(params)[0].double()
        cross_entropy = numerics.softplus(eta) - x.double() * eta
        log_normalizer = continuous_bernoulli_log_norm(eta)
        statistics = {"loss": self.sum_terms(cross_entropy), "log_normalizer": self.sum_terms(log_normalizer)}
        if bins is not None:
            statistics["log_density_width"] = self.log_density_width(log_normalizer - cross_entropy, bins)
        return statistics

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return (x < 0) | (x > 1)

    def verification_points(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return rng.random(shape).astype(np.float32)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The inverse CDF log(1 + u (e^eta - 1)) / eta, in forms that neither overflow nor cancel."""
        eta = self.split(params)[0]
        safe = torch.where(eta.abs() < 1e-6, torch.ones_like(eta), eta)
        positive = 1 + torch.log(uniform + (1 - uniform) * torch.exp(-safe.clamp(min=0))) / safe
        negative = numerics.log1p(uniform * numerics.expm1(safe.clamp(max=0))) / safe
        return torch.where(eta.abs() < 1e-6, uniform, torch.where(eta > 0, positive, negative))


# The count families (Poisson, negative binomial, zero-inflated) register themselves on import.
