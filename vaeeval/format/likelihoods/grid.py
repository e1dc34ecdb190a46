"""Families over the L values k/(L-1): categorical and discretized logistic."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.distributions import Categorical, Distribution

from vaeeval.core import numerics
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods.base import CATEGORICAL, Likelihood, bin_edges, finite_edges, log1mexp, register, spec_levels
from vaeeval.format.terms import PROBABILITY


class _GridLikelihood(Likelihood):
    """A discrete family over the L values k/(L-1), k = 0..L-1."""

    measure = PROBABILITY
    keys = frozenset({"levels"})
    value_range = (0.0, 1.0)

    def __init__(self, spec: Mapping[str, Any], input_shape: tuple[int, ...], params_per_dim: int) -> None:
        super().__init__(spec, input_shape, params_per_dim)
        self.levels = int(spec["levels"])

    @property
    def support(self) -> str:  # type: ignore[override]
        return f"values k/{self.levels - 1} for k = 0..{self.levels - 1}"

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return Grid(self.levels).outside(x)


@register
class CategoricalLikelihood(_GridLikelihood):
    """Categorical over L levels per dimension; the decoder gives L blocks of logits."""

    family = "categorical"
    decoder_outputs = {"logits": None, "probs": CATEGORICAL}

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        return cls(spec, input_shape, spec_levels(spec, cls.family))

    def distribution(self, params: torch.Tensor) -> Distribution:
        return Categorical(logits=params.movedim(self._param_axis(params), -1), validate_args=False)

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log softmax(l)_k at each value's level k (``numerics.log_softmax``, fixed bits on any ISA)."""
        normalized = numerics.log_softmax(params.movedim(self._param_axis(params), -1))
        level = torch.round(x * (self.levels - 1)).long().expand(normalized.shape[:-1])[..., None]
        return normalized.gather(-1, level).squeeze(-1)

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log softmax(l)_k at each value's level k, and its gradient in closed form: onehot(k) - softmax(l)."""
        axis = self._param_axis(params)
        logits = params.movedim(axis, -1)
        normalized = numerics.log_softmax(logits)
        level = torch.round(x * (self.levels - 1)).long().expand(normalized.shape[:-1])[..., None]
        terms = normalized.gather(-1, level).squeeze(-1)
        grad = normalized.exp().neg_().scatter_add_(-1, level, torch.ones_like(level, dtype=normalized.dtype))
        return self.sum_terms(terms), grad.movedim(-1, axis)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(params.movedim(self._param_axis(params), -1), dim=-1)
        below = (probabilities.cumsum(-1) < uniform[..., None]).sum(-1).clamp(max=self.levels - 1)
        return below.to(params.dtype) / (self.levels - 1)


@register
class DiscretizedLogisticLikelihood(_GridLikelihood):
    """Logistic(mean, scale) integrated over the bins of L levels on [0, 1], edge bins open (Salimans et al. 2017).

    P(bin [a, b]) = sigmoid(u_b) - sigmoid(u_a) = sigmoid(u_b) sigmoid(-u_a) (1 - exp(-(u_b - u_a)))
    with u = (edge - mean) / scale: every factor is computed without cancellation.
    """

    family = "discretized_logistic"

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        spec_levels(spec, cls.family)
        return cls(spec, input_shape, 2)

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, log_scale = self.split(params)
        edges = bin_edges(x.to(params.dtype).expand_as(mean), Grid(self.levels), -math.inf, math.inf)
        lower, upper, open_low, open_high = finite_edges(*edges)
        inv_scale = torch.exp(-log_scale)
        u_a, u_b = (lower - mean) * inv_scale, (upper - mean) * inv_scale
        width = (upper - lower) * inv_scale  # the edges' difference, not u_b - u_a: no cancellation
        below, above = -numerics.softplus(-u_b), -numerics.softplus(u_a)  # log P(X <= b), log P(X >= a)
        return torch.where(open_low, below, torch.where(open_high, above, below + above + log1mexp(width)))

    def loss_statistics(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> dict[str, torch.Tensor]:
        """``log_density_width``: the logistic density at the data times the bin width, beside the bins' masses
        (log f = -|u| - 2 softplus(-|u|) - log s, u = (x - mean) / s), in float64."""
        mean, log_scale = (block.double() for block in self.split(params))
        u = ((x.double() - mean) * torch.exp(-log_scale)).abs()
        return {"log_density_width": self.log_density_width(-u - 2 * numerics.softplus(-u) - log_scale, Grid(self.levels))}

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """A logistic draw, binned: the edge bins are open, so values beyond [0, 1] fall into them."""
        mean, log_scale = self.split(params)
        value = mean + torch.exp(log_scale) * (torch.log(uniform) - numerics.log1p(-uniform))
        step = self.levels - 1
        return torch.round(value.clamp(0, 1) * step) / step


# ---------------------------------------------------------------- continuous families
