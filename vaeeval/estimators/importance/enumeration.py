"""Exact log p(x) of a discrete latent with a finite support, by summing over every value of z.

For z taking M values (a K-way categorical: M = K; d Bernoulli units: M = 2**d),

    log p(x) = log sum_z p(x|z) p(z),
    ELBO     = sum_z q(z|x) [log p(x|z) + log p(z) - log q(z|x)],

with recon = sum_z q(z|x) log p(x|z) and KL = sum_z q(z|x) [log q(z|x) - log p(z)]
exact too, all in float64. The support is streamed in blocks of ``SUPPORT_BLOCK`` values
(memory bounded by points x block, whatever M is), each block reduced by fixed trees
and folded into the running sums in support order, so no bit depends on the batch.
The numbers go in the usual columns: iwae is log p(x) with standard error 0, every
standard error is 0, k-hat (a tail fit of importance weights) does not apply and is
null, and the ESS is reported as K; the model's notes say so.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch

from vaeeval.core import numerics
from vaeeval.errors import VaeevalError, option
from vaeeval.format.domains import Grid
from vaeeval.format.model import Model
from vaeeval.format.terms import ANALYTIC
from vaeeval.results.numbers import Part, PointResults
from vaeeval.user.discrete import support_size, support_values
from vaeeval.user.distributions import describe, in_float64
from vaeeval.user.protocol import ArchModel

DEFAULT_MAX_SUPPORT = 2**16
SUPPORT_BLOCK = 256  # values of z per block: fixed, so that the sums' trees never depend on the batch
_ROWS = 4096  # (point, value) pairs per decoder call at most


def support_of(model: Model) -> int | None:
    """How many values z takes, when q(z|x) and p(z) are both discrete and p(z)'s support is finite; else None."""
    if not isinstance(model, ArchModel) or not model.discrete_posterior:
        return None
    return support_size(model.prior.distribution(torch.zeros(())))


def plan(model: Model, enumerate_latent: bool | None, max_support: int) -> int | None:
    """The support size to enumerate, or None to sample.

    Args:
        enumerate_latent: True: enumerate (refused where impossible); False: sample; None: enumerate
            when the support has at most ``max_support`` values.

    Raises:
        VaeevalError: ``enumerate_latent`` on a latent that is not finite and discrete, or past ``max_support``.
    """
    if max_support < 1:
        raise VaeevalError(f"{option('max_support')} must be at least 1, found {max_support}")
    if enumerate_latent is False:
        return None
    size = support_of(model)
    if size is None:
        if enumerate_latent:
            found = getattr(model, "discrete_latent", None) or "a continuous latent"
            raise VaeevalError(
                f"{option('enumerate_latent')} sums over every value of z, which needs q(z|x) and p(z) discrete with a finite "
                f"support vaeeval can list (Bernoulli, Categorical, OneHotCategorical, or Independent of them); "
                f"this model has {found}"
            )
        return None
    if size > max_support:
        if enumerate_latent:
            raise VaeevalError(
                f"{option('enumerate_latent')}: z takes {size:,} values, more than {option('max_support')} {max_support:,}; "
                f"raise {option('max_support')} to sum over them all (the time grows with it), or sample without "
                f"{option('enumerate_latent')}"
            )
        return None
    return size


def enumerated(model: ArchModel, size: int) -> ArchModel:
    """The model as an enumeration reports it: its KL exact, and a note saying how the numbers were made."""
    prior = copy.copy(model.prior)
    prior.kl_kind = ANALYTIC  # type: ignore[misc]  # exact: a finite sum, with no sampling error
    note = (
        f"log p(x) exact: summed over all {size:,} values of z ({describe(model.prior.distribution(torch.zeros(())))}) "
        "in float64; iwae is log p(x) and the ELBO, recon and KL are exact (standard errors 0); k-hat does not apply "
        "(null) and ess is reported as K; --samples is not used"
    )
    return dataclasses.replace(model, prior=prior, notes=(*model.notes, note))


def sampled(model: Model) -> Model:
    """The model as sampling reports it: where q(z|x) is a point mass (a VQ-VAE's deterministic encoder), a note
    saying why every importance weight of a point is the same, so that iwae = elbo."""
    if not isinstance(model, ArchModel) or not model.point_mass:
        return model
    note = (
        "q(z|x) is a point mass (probability 1 on one z, as a VQ-VAE's nearest codes): every "
        "draw is that z, so each importance weight is p(x|z) p(z) / 1, iwae = elbo = log p(x|z) + log p(z) and "
        "KL = -log p(z) (M log K for a uniform prior over K codes at M positions): the bound VQ-VAE papers report, "
        "not log p(x); k-hat and ess say only that the weights are equal"
    )
    return dataclasses.replace(model, notes=(*model.notes, note))


@dataclasses.dataclass(frozen=True)
class ExactEstimates:
    """One batch's exact numbers, float64 ``[B]`` (``q_mean``, ``q_var`` ``[B, L]``): ``evaluate``'s
    ``BatchEstimates`` for an enumeration, which has no importance weights (so no k-hat)."""

    elbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    log_px: torch.Tensor
    q_mean: torch.Tensor
    q_var: torch.Tensor

    def part(self, rows: np.ndarray, samples: int, checkpoints: int) -> Part:
        """These points' NumPy results: standard errors 0, ess K, k-hat null, the convergence flat at log p(x)."""
        log_px = self.log_px.cpu().numpy()
        zero = np.zeros(rows.size)
        points = PointResults(
            index=rows.copy(), elbo=self.elbo.cpu().numpy(), recon=self.recon.cpu().numpy(), kl=self.kl.cpu().numpy(),
            iwae=log_px,
            kl_stderr=zero, elbo_stderr=zero, iwae_stderr=zero, ess=np.full(rows.size, float(samples)),
            khat=np.full(rows.size, math.nan), unreliable=np.zeros(rows.size, dtype=bool),
        )
        convergence = np.repeat(log_px[:, None], checkpoints, axis=1)
        means, variances = self.q_mean.cpu().numpy(), self.q_var.cpu().numpy()
        return Part(points=points, convergence=convergence, latent_means=means, latent_vars=variances)


class _Sums:
    """The running sums of one batch of points over the support, in support order."""

    def __init__(self, rows: int, latent: int, device: torch.device) -> None:
        self.log_px = torch.full((rows,), -math.inf, dtype=torch.float64, device=device)
        self.recon, self.kl = torch.zeros_like(self.log_px), torch.zeros_like(self.log_px)
        self.mean = torch.zeros(rows, latent, dtype=torch.float64, device=device)
        self.square = torch.zeros_like(self.mean)

    def add(self, z: torch.Tensor, log_px_z: torch.Tensor, log_pz: torch.Tensor, log_qz: torch.Tensor) -> None:
        """One block: values ``z [m, L]``, ``log_px_z`` and ``log_qz [B, m]``, ``log_pz [m]``."""
        self.log_px = numerics.logaddexp(self.log_px, numerics.logsumexp(log_px_z + log_pz, dim=1))
        q = numerics.exp(log_qz)
        self.recon = self.recon + numerics.tree_sum(_weighted(q, log_px_z))
        self.kl = self.kl + numerics.tree_sum(_weighted(q, log_qz - log_pz))
        self.mean = self.mean + numerics.tree_sum(q[:, None, :] * z.T[None], dim=-1)
        self.square = self.square + numerics.tree_sum(q[:, None, :] * (z * z).T[None], dim=-1)


def _weighted(q: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """q x value, 0 where q is 0 (whatever the value: log q and log p(x|z) may be -inf there)."""
    return torch.where(q > 0, q * value, 0.0)


def enumerate_batch(
    model: ArchModel,
    x: torch.Tensor,
    size: int,
    bins: Grid | None,
    covariates: Mapping[str, torch.Tensor] | None = None,
) -> ExactEstimates:
    """Exact estimates ``[B, ...]`` float64 for the points ``x``, summing over the ``size`` values of z."""
    covariates = dict(covariates or {})
    q, prior = in_float64(model.posterior(x, covariates)), model.prior.distribution(x)
    rows, latent = x.shape[0], model.latent_dim
    sums = _Sums(rows, latent, x.device)
    for start in range(0, size, SUPPORT_BLOCK):
        z = support_values(prior, start, min(size, start + SUPPORT_BLOCK)).to(x.device)  # [m, L]
        count = z.shape[0]
        log_qz = model.user_log_prob("encode(x)", q, z[:, None].expand(count, rows, latent)).T  # [B, m]
        log_pz = model.user_log_prob("prior()", prior, z)  # [m]
        sums.add(z, _log_likelihood(model, x, z, covariates, bins), log_pz, log_qz)
    variance = (sums.square - sums.mean * sums.mean).clamp(min=0.0)
    return ExactEstimates(sums.recon - sums.kl, sums.recon, sums.kl, sums.log_px, sums.mean, variance)


def _log_likelihood(
    model: ArchModel, x: torch.Tensor, z: torch.Tensor, covariates: Mapping[str, torch.Tensor], bins: Grid | None
) -> torch.Tensor:
    """log p(x|z) ``[B, m]`` of every point with every value ``z [m, L]``, a few points per decoder call."""
    rows, count = x.shape[0], z.shape[0]
    step = max(1, _ROWS // count)
    pieces = []
    for first in range(0, rows, step):
        points = slice(first, min(rows, first + step))
        n = points.stop - points.start
        values = z.to(torch.float32).repeat(n, 1)  # point-major: each point's m values in turn
        each = {name: value[points].repeat_interleave(count, dim=0) for name, value in covariates.items()}
        found = model.log_likelihood(values, x[points].repeat_interleave(count, dim=0), each, bins)
        pieces.append(found.reshape(n, count))
    return torch.cat(pieces)
