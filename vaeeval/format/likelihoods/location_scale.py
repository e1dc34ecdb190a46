"""Gaussian and Laplace p(x|z): densities, or bin probabilities on discrete data."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch.distributions import Distribution, Laplace, Normal

from vaeeval.errors import SpecError
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods.base import (
    HALF_LOG_2PI,
    LOG_HALF,
    Likelihood,
    bin_edges,
    finite_edges,
    log_symmetric_bin,
    positive_number,
    register,
    scale_tensor,
)
from vaeeval.format.terms import DENSITY


class _LocationScale(Likelihood):
    """A symmetric location-scale family; scale fixed, a tensor, or a decoder output (P = 2)."""

    measure = DENSITY
    support = "finite real numbers"
    base: ClassVar[type[Distribution]]
    power: ClassVar[int]  # the loss is sum_d |x_d - mu_d|^power: the squared error (Gaussian) or the absolute one (Laplace)
    scale_key: ClassVar[str]
    log_scale_key: ClassVar[str]

    decoder_outputs = {"logits": None, "mean": None}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.keys = frozenset({cls.scale_key, cls.log_scale_key})
        cls.tensor_keys = (cls.log_scale_key,)
        cls.scale_keys = (cls.scale_key, cls.log_scale_key)

    def __init__(
        self,
        spec: Mapping[str, Any],
        input_shape: tuple[int, ...],
        params_per_dim: int,
        scale: float | torch.Tensor | None,
    ) -> None:
        super().__init__(spec, input_shape, params_per_dim)
        self.scale = scale  # None: the decoder's second block is the log-scale

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        if cls.scale_key in spec and cls.log_scale_key in spec:
            raise SpecError(f"likelihood: give {cls.scale_key} or {cls.log_scale_key}, not both")
        if cls.scale_key in spec:
            return cls(spec, input_shape, 1, positive_number(spec, cls.scale_key))
        if cls.log_scale_key in spec:
            log_scale = scale_tensor(spec, cls.log_scale_key, tensors, input_shape)
            likelihood = cls(spec, input_shape, 1, log_scale.exp())
            likelihood.values = {cls.log_scale_key: log_scale}
            return likelihood
        return cls(spec, input_shape, 2, None)

    def location_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.split(params)
        if self.scale is None:
            return blocks[0], blocks[1].exp()
        return blocks[0], torch.as_tensor(self.scale, dtype=params.dtype, device=params.device)

    def distribution(self, params: torch.Tensor) -> Distribution:
        return self.base(*self.location_scale(params), validate_args=False)

    @staticmethod
    @abstractmethod
    def standard_log_cdf(t: torch.Tensor) -> torch.Tensor:
        """log F(t) of the standardized family."""

    @staticmethod
    @abstractmethod
    def standard_log_pdf(t: torch.Tensor) -> torch.Tensor:
        """log f(t) of the standardized family."""

    def _standardized_bins(self, params: torch.Tensor, x: torch.Tensor, bins: Grid):
        location, scale = self.location_scale(params)
        lower, upper, open_low, open_high = finite_edges(*bin_edges(x.expand_as(location), bins, -math.inf, math.inf))
        return (lower - location) / scale, (upper - location) / scale, open_low, open_high, scale

    def log_bin_probability(self, params: torch.Tensor, x: torch.Tensor, bins: Grid) -> torch.Tensor:
        a, b, open_low, open_high, _ = self._standardized_bins(params, x, bins)
        return log_symmetric_bin(self.standard_log_cdf, a, b, open_low, open_high)

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """On bins, the gradient in closed form: with a, b the bin's standardized edges and P its probability,
        d log P / d location = -(f(b) - f(a)) / (scale P) and d log P / d log scale = -(b f(b) - a f(a)) / P
        (an open edge contributes nothing); each ratio f / P is taken as exp(log f - log P)."""
        if bins is None:
            return super().log_prob_and_grad(params, x, bins)
        wide = params.double()
        a, b, open_low, open_high, scale = self._standardized_bins(wide, x.double(), bins)
        terms = log_symmetric_bin(self.standard_log_cdf, a, b, open_low, open_high)
        at_b = torch.where(open_high, 0.0, torch.exp(self.standard_log_pdf(b) - terms))
        at_a = torch.where(open_low, 0.0, torch.exp(self.standard_log_pdf(a) - terms))
        grads = [-(at_b - at_a) / scale]
        if self.scale is None:  # the decoder's second block is the log-scale
            grads.append(-(b * at_b - a * at_a))
        grad = torch.stack(grads, dim=self._param_axis(params)).to(params.dtype)
        return self.sum_terms(terms), grad

    def loss_statistics(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> dict[str, torch.Tensor]:
        """``loss`` sum_d |x_d - mu_d|^p, ``weighted_loss`` sum_d |x_d - mu_d|^p / s_d^p, ``log_scale`` sum_d log s_d
        (the decoder's own log s_d(z), or the fixed scale as evaluated), in float64; on bins also ``log_density_width``."""
        location, scale = self.location_scale(params if bins is None else params.double())  # a fixed scale as evaluated
        if self.scale is None:
            log_scale = self.split(params)[1].double()
        else:
            log_scale = torch.log(scale.double()).expand_as(location)
        residual = x.double() - location.double()
        standardized = residual / scale.double()
        statistics = {
            "loss": self.sum_terms(residual.abs() ** self.power),
            "weighted_loss": self.sum_terms(standardized.abs() ** self.power),
            "log_scale": self.sum_terms(log_scale),
        }
        if bins is not None:
            statistics["log_density_width"] = self.log_density_width(self.standard_log_pdf(standardized) - log_scale, bins)
        return statistics

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(x.shape, dtype=bool)

    def to(self, device):
        if isinstance(self.scale, torch.Tensor):
            moved = type(self)(self.spec, self.input_shape, self.params_per_dim, self.scale.to(device))
            moved.values = self.values
            return moved
        return self


@register
class GaussianLikelihood(_LocationScale):
    """Normal(mean, sigma) per dimension.

    log p(x|z) = -sum_d (x_d - mu_d)^2 / (2 sigma_d^2) - sum_d log sigma_d - D/2 log(2 pi):
    the squared error is only the first term.
    """

    family = "gaussian"
    base = Normal
    power = 2
    scale_key, log_scale_key = "sigma", "log_sigma"

    @staticmethod
    def standard_log_cdf(t: torch.Tensor) -> torch.Tensor:
        return torch.special.log_ndtr(t)

    @staticmethod
    def standard_log_pdf(t: torch.Tensor) -> torch.Tensor:
        return -0.5 * t * t - HALF_LOG_2PI


@register
class LaplaceLikelihood(_LocationScale):
    """Laplace(location, scale) per dimension: log p = -|x - mu| / b - log(2 b)."""

    family = "laplace"
    base = Laplace
    power = 1
    scale_key, log_scale_key = "scale", "log_scale"

    @staticmethod
    def standard_log_cdf(t: torch.Tensor) -> torch.Tensor:
        # F(t) = exp(t) / 2 below 0 and 1 - exp(-t) / 2 above; clamps keep the unused branch finite
        return torch.where(t < 0, LOG_HALF + t.clamp(max=0), torch.log(1 - 0.5 * torch.exp(-t.clamp(min=0))))

    @staticmethod
    def standard_log_pdf(t: torch.Tensor) -> torch.Tensor:
        return LOG_HALF - t.abs()
