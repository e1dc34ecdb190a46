"""Pure tensor math for the estimators: importance log-weights and streaming reductions.

For a point x and K samples z_k ~ q(z|x):

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x)
    recon   = (1/K) sum_k log p(x|z_k)
    elbo    = recon - KL(q(z|x) || p(z))                 (Kingma & Welling 2014)
    iwae    = logsumexp_k log w_k - log K                (Burda, Grosse & Salakhutdinov 2016)

When KL(q || p) has no closed form (a mixture prior) it is estimated from the
same samples, (1/K) sum_k log q(z_k|x) - log p(z_k), and then elbo is exactly
the mean log-weight.

Samples arrive in chunks, so the reductions over k are streamed: the state
per point is one float64 number, whatever K is. To make the result independent
of the chunk size, every reduction runs over fixed blocks of ``BLOCK`` samples
(the last one padded with the reduction's identity) and folds the blocks into
the state one at a time, in sample order; chunks hold whole blocks. Within a
block, sums are fixed pairwise trees and log-sum-exps use ``numerics``' own exp
and log, so no bit depends on torch's reduction order or the CPU's vector code.
"""

from __future__ import annotations

import math

import torch

import vaeeval.core.numerics as numerics
from vaeeval.core.numerics import tree_sum

BLOCK = 64


def log_weights(log_px_z: torch.Tensor, log_pz: torch.Tensor, log_qz: torch.Tensor) -> torch.Tensor:
    """``log w = log p(x|z) + log p(z) - log q(z|x)``, all ``[B, S]`` -> ``[B, S]``."""
    return log_px_z + log_pz - log_qz


def _blocks(values: torch.Tensor, fill: float) -> torch.Tensor:
    """``[B, S]`` -> ``[B, ceil(S / BLOCK), BLOCK]``, the tail padded with ``fill``."""
    rows, count = values.shape
    padded = -count % BLOCK
    if padded:
        values = torch.cat([values, values.new_full((rows, padded), fill)], dim=1)
    return values.reshape(rows, -1, BLOCK)


def fold_sum(total: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add the sum over samples of ``values [B, S]`` to ``total [B]``, block by block."""
    for block_sum in tree_sum(_blocks(values, 0.0)).unbind(dim=1):
        total = total + block_sum
    return total


class LogSumExp:
    """Streaming log Σ_k w_k and log Σ_k w_k² per point, from log-weights arriving in chunks of whole blocks.

    The state is each point's running maximum m and the sums s = Σ exp(v_k - m) and
    s2 = Σ exp(2 (v_k - m)). A block with maximum M and sums S, S2 taken at M (fixed
    trees) updates them, in sample order, as

        m' = max(m, M),  s' = s e^(m - m') + S e^(M - m'),  s2' = s2 e^(2(m - m')) + S2 e^(2(M - m')),

    the exponentials of a whole chunk's blocks computed at once (``numerics.exp``), so a
    block costs a few elementwise products and nothing depends on how samples were chunked.
    log Σ w = m + log s; the ESS (Σ w)² / Σ w² is s² / s2, with no exp or log at all.
    """

    def __init__(self, rows: int, like: torch.Tensor) -> None:
        self.top = torch.full((rows,), -math.inf, dtype=torch.float64, device=like.device)
        self.sum = torch.zeros_like(self.top)
        self.sum_squares = torch.zeros_like(self.top)

    def update(self, log_values: torch.Tensor, first: int = 0, checkpoints: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
        """Add samples ``first .. first + S - 1`` (``log_values [B, S]``; ``first`` a multiple of ``BLOCK``).

        Returns:
            ``{k: log Σ of samples 0 .. k-1}`` for each checkpoint k in ``(first, first + S]``.
        """
        blocks = _blocks(log_values.double(), -math.inf)  # [B, n, BLOCK]
        block_top = blocks.amax(-1)
        scaled = numerics.exp(blocks - torch.where(block_top.isfinite(), block_top, 0.0)[..., None])
        block_sum, block_squares = tree_sum(scaled), tree_sum(scaled * scaled)
        running = torch.maximum(torch.cummax(block_top, dim=1).values, self.top[:, None])  # m after each block
        before = torch.cat([self.top[:, None], running[:, :-1]], dim=1)
        exponents = torch.stack([torch.where(before.isfinite(), before - running, -math.inf),
                                 torch.where(block_top.isfinite(), block_top - running, -math.inf)])
        decay, gain = numerics.exp(exponents).unbind(0)
        prefixes = {}
        for index in range(blocks.shape[1]):
            start = first + index * BLOCK
            for k in checkpoints:
                if start < k <= start + BLOCK:
                    so_far = self.top + numerics.log(self.sum)
                    prefixes[k] = numerics.logaddexp(so_far, numerics.logsumexp(blocks[:, index, : k - start]))
            d, g = decay[:, index], gain[:, index]
            self.sum = self.sum * d + block_sum[:, index] * g
            self.sum_squares = self.sum_squares * (d * d) + block_squares[:, index] * (g * g)
            self.top = running[:, index]
        return prefixes

    def log_sum(self) -> torch.Tensor:
        """log Σ_k w_k, ``[B]``."""
        return self.top + numerics.log(self.sum)

    def effective_sample_size(self) -> torch.Tensor:
        """(Σ w)² / Σ w² (Kong 1992), ``[B]``."""
        return self.sum * self.sum / self.sum_squares


def effective_sample_size(log_sum_w: torch.Tensor, log_sum_w2: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / sum w^2 from the logs of both sums (Kong 1992)."""
    return numerics.exp(2 * log_sum_w - log_sum_w2)


def iwae_stderr(ess: torch.Tensor, samples: int) -> torch.Tensor:
    """Delta-method standard error of log(mean w): SE^2 = 1/ESS - 1/K (0 for equal weights)."""
    return (1 / ess - 1 / samples).clamp(min=0).sqrt()


def iwae_bound(logsumexp_w: torch.Tensor, samples: int) -> torch.Tensor:
    """The importance-weighted estimate of log p(x): ``logsumexp_k log w_k - log K``."""
    return logsumexp_w - math.log(samples)


class Moments:
    """Streaming mean and Monte Carlo standard error over samples, per point.

    Sums run over x - c, where c is each point's sample 0: close to the mean, so
    the variance does not cancel catastrophically (log-weights of -1e4 +- 1), and
    the same whatever the chunking, since sample 0 is always in the first chunk.
    """

    def __init__(self) -> None:
        self.shift: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def update(self, values: torch.Tensor) -> None:
        """Add the samples ``values [B, S]``, the next chunk in sample order."""
        if self.shift is None:
            self.shift = values[:, 0].clone()
            self.total = torch.zeros_like(self.shift)
            self.squares = torch.zeros_like(self.shift)
        centered = values - self.shift[:, None]
        self.total = fold_sum(self.total, centered)
        self.squares = fold_sum(self.squares, centered * centered)

    def mean(self, samples: int) -> torch.Tensor:
        """The sample mean, ``[B]``."""
        return self.shift + self.total / samples

    def stderr(self, samples: int) -> torch.Tensor:
        """Standard error of the mean, sqrt(var / K) with the unbiased variance; NaN for K = 1."""
        if samples < 2:
            return torch.full_like(self.shift, math.nan)
        variance = (self.squares - self.total * self.total / samples) / (samples - 1)
        return (variance.clamp(min=0) / samples).sqrt()
