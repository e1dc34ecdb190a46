"""Bernoulli p(x|z) for binary data, with the shortcut through a last linear layer."""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import Bernoulli, Distribution

from vaeeval.core import numerics
from vaeeval.core.numerics import fold_, row_sums
from vaeeval.format.likelihoods.base import BINARY, NORMAL_EXPONENT, Likelihood, register
from vaeeval.format.terms import PROBABILITY


@register
class BernoulliLikelihood(Likelihood):
    """Bernoulli(sigmoid(logit)) per dimension; log p(x|z) is minus the binary cross-entropy."""

    family = "bernoulli"
    measure = PROBABILITY
    support = "exactly 0 or 1"
    value_range = (0.0, 1.0)
    levels = 2
    linear_shortcut = True
    decoder_outputs = {"logits": None, "probs": BINARY, "mean": BINARY}

    def distribution(self, params: torch.Tensor) -> Distribution:
        return Bernoulli(logits=self.split(params)[0], validate_args=False)

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x l - softplus(l): torch's Bernoulli (binary cross-entropy) changes its last bit with the ISA."""
        logits = self.split(params)[0]
        return x * logits - numerics.softplus(logits)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return (x != 0) & (x != 1)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        return (torch.log(uniform) < -numerics.softplus(-self.split(params)[0])).to(params.dtype)

    def log_prob_through_linear(self, hidden, logits, projected, offset):
        """sum_d x_d l_d - softplus(l_d), through the last linear layer l = W h + b; overwrites ``hidden`` and ``logits``.

        softplus(l) = l/2 + |l|/2 + log(1 + exp(-|l|)), and sum_d (x_d - 1/2) l_d = h . ((x - 1/2) W) + (x - 1/2) . b
        costs one dot product per sample. What is left per element is one exp; the logs
        are taken of products of up to 16 factors 1 + exp(-|l|), each in (1, 2], which
        costs a sixteenth of a log per element and loses nothing beside the float32
        rounding of |l|/2 in the same sum. Every step is exactly rounded or position-independent
        on the CPU (torch's softplus is not), so a row's result is the same in any batch.
        """
        agreement = row_sums(hidden.mul_(projected[:, None, :]), consume=True) + offset[:, None]
        negative = logits.copysign_(-1.0)  # -|l|, one pass
        halves = row_sums(negative).mul_(-0.5)
        factors = negative.clamp_(min=-NORMAL_EXPONENT).exp_().add_(1)  # 1 + exp(-|l|), never subnormal, in place
        products = fold_(factors, torch.mul, most=16)
        return agreement - halves - row_sums(products.double().log_())

    def log_prob_and_grad_through_linear(
        self, hidden: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, projected: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_prob_through_linear`` and the gradient in the logits, x - sigmoid(l), sharing one exp per element.

        Args:
            hidden: ``[B, S, H]`` the last linear layer's input (read, not overwritten).
            logits: ``[B, S, D]`` its output (consumed).
            x: ``[B, 1, D]`` the data.
            projected, offset: from ``linear_projection``.

        Returns:
            ``[B, S]`` float64 log p(x|z) and ``[B, S, D]`` its gradient in the logits.
        """
        agreement = row_sums(hidden * projected[:, None, :], consume=True) + offset[:, None]
        negative = torch.copysign(logits, -1.0)
        halves = row_sums(negative).mul_(-0.5)
        factors = negative.clamp_(min=-NORMAL_EXPONENT).exp_().add_(1)  # 1 + exp(-|l|), in (1, 2], never subnormal
        # sigmoid(l) - 1/2 = sign(l) (sigmoid(|l|) - 1/2), so x - sigmoid(l) = (x - 1/2) - copysign(sigmoid(|l|) - 1/2, l)
        grad = factors.reciprocal().sub_(0.5).copysign_(logits)
        torch.sub(x - 0.5, grad, out=grad)
        products = fold_(factors, torch.mul, most=16)
        return agreement - halves - row_sums(products.double().log_()), grad

    def linear_projection(self, x: torch.Tensor, head: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """``((x - 1/2) W, (x - 1/2) . b)`` for ``x [B, D]``: what ``log_prob_through_linear`` needs per point."""
        centered = x - 0.5
        offset = row_sums(centered * head.bias) if head.bias is not None else centered.new_zeros(x.shape[0], dtype=torch.float64)
        return centered @ head.weight, offset
