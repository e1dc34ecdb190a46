"""Where AIS chains start: q0, drawn keyed by point and chain, and its widths."""

from __future__ import annotations

import numpy as np
import torch
from torch.distributions import Distribution

from vaeeval.core import rng
from vaeeval.core.numerics import tree_sum
from vaeeval.estimators.annealing.kernel import Streams, chain_counters, decodable, gaussian_draws, prior_draws
from vaeeval.format.model import Model
from vaeeval.user.distributions import draw, moments, noise_width


class Start:
    """q0, where every chain starts: q(z|x) (``init="encoder"``) or p(z), drawn keyed by point and chain.

    Args:
        model: the model.
        init: ``encoder`` or ``prior``.
        seed: the noise seed.
        mean, std: a diagonal q(z|x) ``[B, L]`` (format 1's path), or
        posterior: any q(z|x) of batch ``[B]`` (the general path).
        like: a tensor of the device to compute on.
    """

    def __init__(
        self,
        model: Model,
        init: str,
        seed: int,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        *,
        posterior: Distribution | None = None,
        like: torch.Tensor,
    ) -> None:
        self.model, self.init, self.seed = model, init, seed
        self.mean, self.std, self.posterior, self.device = mean, std, posterior, like.device
        self.from_prior: torch.Tensor | None = None  # [B] bool: points that start from the prior instead (--init auto)

    def draw(self, rows: np.ndarray, chains: int, streams: Streams) -> torch.Tensor:
        """``[B, C, L]`` starting points, exact in float32."""
        if self.init == "prior":
            return prior_draws(self.model.prior, self.seed, rows, chains, streams, self.device)
        if self.from_prior is not None and self.from_prior.any():
            own = self._encoder_draws(rows, chains, streams)
            prior = prior_draws(self.model.prior, self.seed, rows, chains, streams, self.device)
            return torch.where(self.from_prior[:, None, None], prior, own)
        return self._encoder_draws(rows, chains, streams)

    def _encoder_draws(self, rows: np.ndarray, chains: int, streams: Streams) -> torch.Tensor:
        if self.posterior is None:
            return gaussian_draws(self.mean, self.std, self.seed, rows, chains, streams)
        width = noise_width(self.posterior)
        normal = rng.normal(self.seed, rows, chain_counters(0, chains, width), streams.init).to(self.device)
        uniform = torch.from_numpy(rng.uniform(self.seed, rows, chain_counters(0, chains, 1)[:, 0], streams.component))
        z = draw(self.posterior, normal.transpose(0, 1), uniform.to(self.device).transpose(0, 1), (self.seed, int(rows[0]), streams.init))
        return decodable(z.transpose(0, 1).double())

    def stds(self, z: torch.Tensor) -> torch.Tensor:
        """q0's standard deviations per point ``[B, L]`` (from the draws ``z [B, C, L]`` where it has none)."""
        if self.from_prior is not None and self.from_prior.any():
            return torch.where(self.from_prior[:, None], self._stds("prior", z), self._stds(self.init, z))
        return self._stds(self.init, z)

    def _stds(self, init: str, z: torch.Tensor) -> torch.Tensor:
        if init == "encoder" and self.std is not None:
            return self.std
        q0 = self.model.prior.distribution(z) if init == "prior" else self.posterior
        found = moments(q0)
        if found is not None:
            return found[1].double().sqrt().expand(z.shape[0], z.shape[2]).to(z.device)
        if z.shape[1] < 2:
            return torch.ones(z.shape[0], z.shape[2], dtype=z.dtype, device=z.device)
        deviations = z - tree_sum(z, dim=1)[:, None] / z.shape[1]
        return (tree_sum(deviations * deviations, dim=1) / (z.shape[1] - 1)).sqrt()
