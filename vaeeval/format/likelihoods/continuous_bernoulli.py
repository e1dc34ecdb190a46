"""The continuous Bernoulli p(x|z) on [0, 1] (Loaiza-Ganem & Cunningham 2019), with a stable log-normalizer."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.distributions import ContinuousBernoulli, Distribution
from torch.distributions.utils import broadcast_all

from vaeeval.core import numerics
from vaeeval.errors import VaeevalError
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods.base import BINARY, Likelihood, bin_edges, register
from vaeeval.format.terms import DENSITY

SERIES_BELOW = 1e-3  # |eta| below which a bin's log-probability is taken from its series
NARROWEST_BIN = 1e-9  # 65 536 levels on [0, 1] give 7.6e-6
GRADIENT_SERIES_BELOW = 0.1  # and the gradients (density and bins)


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
        """P([a, b]) = (e^(b eta) - e^(a eta)) / (e^eta - 1), in logs without cancellation (differentiable)."""
        return self._bin_terms(self.split(params)[0], x, bins)[0]

    def _bin_terms(self, eta: torch.Tensor, x: torch.Tensor, bins: Grid) -> tuple[torch.Tensor, ...]:
        """log P per dimension, and what its gradient reuses: the edges a and b, |eta|, where the series
        is used, 1 - e^(-(b - a)|eta|) and 1 - e^(-|eta|).

        With s = |eta| and w = b - a: log P = a min(eta, 0) + (b - 1) max(eta, 0) + log((1 - e^(-w s)) /
        (1 - e^(-s))) (one of the first two is 0, so their sum is exact). Below s = 1e-3 the cumulant series
        of the two uniform densities' log-MGFs, log w + (a + b - 1) eta / 2 + (w^2 - 1) eta^2 / 24 (next
        term (1 - w^4) eta^4 / 2880 < 4e-16); the closed form sees s clamped to 1e-3 (no 0/0).
        """
        narrowest = _narrowest_bin(bins)
        if narrowest < NARROWEST_BIN:  # Kahan's 1 - e^-y needs y = w s >= 1e-12
            raise VaeevalError(f"the continuous Bernoulli cannot score bins narrower than {NARROWEST_BIN:g} on [0, 1]; "
                               f"the grid {bins.levels} levels from {bins.low:g} to {bins.high:g} has one of {narrowest:g}")
        a, b = bin_edges(x, bins, 0.0, 1.0)  # x broadcasts against eta: the edges once per point, not per sample
        width = b - a
        size = eta.abs()
        series = size < SERIES_BELOW
        clear = size.clamp(min=SERIES_BELOW)
        inner, outer = _one_minus_exp(width * clear), _one_minus_exp(clear)
        exact = a * eta.clamp(max=0) + (b - 1) * eta.clamp(min=0) + torch.log(inner / outer)
        near_zero = torch.log(width) + (a + b - 1) / 2 * eta + (width * width - 1) / 24 * (eta * eta)
        return torch.where(series, near_zero, exact), a, b, size, series, inner, outer

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) per point and its gradient in the logits (``_density_gradient``, ``_bin_gradient``), in
        closed form (no graph), the gradient from the accurate 1 - e^-y the values took."""
        eta = self.split(params.detach())[0].double()
        if bins is None:
            terms = self.terms(params.detach(), x)
            size = eta.abs()
            grad = _density_gradient(eta, x.double(), size, _one_minus_exp(size.clamp(min=SERIES_BELOW)))
        else:
            terms, a, b, size, _, inner, outer = self._bin_terms(eta, x.double(), bins)
            grad = _bin_gradient(eta, a, b, size, inner, outer)
        return self.sum_terms(terms), self._as_params(grad, params)

    def grad(self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None) -> torch.Tensor:
        """The gradient alone, with 1 - e^-y taken as 1 - exp(-y): its relative error, 1e-16 / y, is
        below 2e-9 in the gradient wherever the series (|eta| < 0.1) is not used."""
        eta = self.split(params.detach())[0].double()
        size = eta.abs()
        if bins is None:
            grad = _density_gradient(eta, x.double(), size, 1 - torch.exp(-size))
        else:
            a, b = bin_edges(x.double(), bins, 0.0, 1.0)
            grad = _bin_gradient(eta, a, b, size, 1 - torch.exp(-(b - a) * size), 1 - torch.exp(-size))
        return self._as_params(grad, params)

    def _as_params(self, grad: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The logits' gradient ``[..., *input_shape]`` in the shape and dtype of ``params`` (P = 1)."""
        return grad.unsqueeze(self._param_axis(params)).to(params.dtype)

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


def _density_gradient(eta: torch.Tensor, x: torch.Tensor, size: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """d log p(x|eta) / d eta = x - mean(eta), mean = 1/2 + sign(eta) (1/(1 - e^-s) - 1/s - 1/2) (s = |eta|,
    ``outer`` = 1 - e^-s), the exponential family's mean; below s = 0.1 from the series of u / (1 - e^-u),
    1 + u/2 + u^2/12 - u^4/720 + u^6/30240 - ...: sign(eta) (...) = eta (1/12 - s^2/720 + s^4/30240)."""
    squared = size * size
    odd = torch.where(
        size < GRADIENT_SERIES_BELOW,
        ((squared / 30240 - 1 / 720) * squared + 1 / 12) * eta,
        torch.sign(eta) * (1 / outer - 1 / size - 0.5),
    )
    return x - 0.5 - odd


def _bin_gradient(
    eta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, size: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor
) -> torch.Tensor:
    """d log P([a, b] | eta) / d eta, given s = |eta|, ``inner`` = 1 - e^(-w s) and ``outer`` = 1 - e^-s (w = b - a).

    With r = w / (1 - e^(-w s)) - 1 / (1 - e^-s) - (w - 1)/2, the derivative is (a + b - 1)/2 + sign(eta) r
    (a + r + (w - 1)/2 above 0, b - 1 - r - (w - 1)/2 below: P's own formula on either side). Below
    s = 0.1, where r's two terms cancel, its series (from u / (1 - e^-u) as in ``_density_gradient``):
    sign(eta) r = eta ((w^2 - 1)/12 - (w^4 - 1) s^2/720 + (w^6 - 1) s^4/30240), truncation < 1e-13.
    """
    width = b - a
    squared, s2 = width * width, size * size
    cubed = squared * squared * squared
    odd = torch.where(
        size < GRADIENT_SERIES_BELOW,
        (((cubed - 1) / 30240 * s2 - (squared * squared - 1) / 720) * s2 + (squared - 1) / 12) * eta,
        torch.sign(eta) * (width / inner - 1 / outer - (width - 1) / 2),
    )
    return (a + b - 1) / 2 + odd


def _narrowest_bin(bins: Grid) -> float:
    """The narrowest bin of ``bins`` on [0, 1]: one step, or an outermost bin reaching 0 or 1."""
    half = 0.5 * bins.step
    return min(bins.low + half, 1.0 - bins.high + half, *((bins.step,) if bins.levels > 2 else ()))


def _one_minus_exp(y: torch.Tensor) -> torch.Tensor:
    """1 - e^-y for y >= 1e-12 (a bin's w s: w >= ``NARROWEST_BIN``), accurate for small y: Kahan's
    (1 - u) y / -log u with u = e^-y rounded (exactly rounded operations and torch's exp and log,
    whose bits are the same on every ISA). y is clamped to 700: 1 - e^-700 rounds to 1."""
    y = y.clamp(max=700.0)
    u = torch.exp(-y)
    return (u - 1) * (y / torch.log(u))


# The count families (Poisson, negative binomial, zero-inflated) register themselves on import.
