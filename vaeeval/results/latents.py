"""Latent health: which units the encoder uses, and how much information q(z|x) carries about x.

* KL per latent dimension, averaged over the data (priors that factorize over dimensions).
* Active units (Burda, Grosse & Salakhutdinov 2016): unit u is active when
  Var_x(E_q[z_u | x]) > 0.01.
* The mutual information I(x; z) under the encoder's joint q(x, z) = p_data(x) q(z|x):
  E_x E_{q(z|x)}[log q(z|x) - log q(z)], with the aggregate posterior
  q(z) = (1/N) sum_n q(z|x_n) taken over the whole evaluation set, in chunks.
* ELBO surgery (Hoffman & Johnson 2016): mean KL = I(x; z) + KL(q(z) || p(z)), so the
  aggregate-posterior KL is the mean KL minus the mutual information.
* For a hierarchical latent, per group: its KL (``estimators/importance/groups.py``) and its
  active units (``group_health``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.distributions import Independent, Normal

from vaeeval.core import numerics
from vaeeval.core.rng import standard_normal
from vaeeval.format.priors import Prior
from vaeeval.results.numbers import exact_mean, exact_variance

ACTIVE_THRESHOLD = 0.01
_CHUNK = 1024
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class GroupHealth:
    """One group of a hierarchical latent over a data set.

    ``kl`` is the mean over points of the group's KL, ``kl_stderr`` its Monte Carlo standard
    error (sqrt(Σ_i se_i²) / N: the draws' error, not the spread over points), ``kl_kind``
    analytic or monte_carlo; all three None where p(z) does not split by group.
    """

    name: str
    units: tuple[int, int]  # [start, stop) of the flat z
    active_units: int
    kl: float | None
    kl_stderr: float | None
    kl_kind: str | None


@dataclass(frozen=True)
class LatentHealth:
    """What the encoder does with its latent units, over a data set."""

    kl_per_dim: np.ndarray | None  # [L] mean over points; None for a prior that does not factorize
    activity: np.ndarray  # [L] Var_x(E_q[z_u])
    active: np.ndarray  # [L] bool
    mutual_information: float  # I(x; z) under q, nats
    mean_kl: float  # mean over points of KL(q(z|x) || p(z))
    aggregate_kl: float  # KL(q(z) || p(z)) = mean_kl - mutual_information
    max_information: float  # log N: no estimate over N points can exceed it
    threshold: float = ACTIVE_THRESHOLD  # a unit is active when its activity exceeds this
    groups: tuple[GroupHealth, ...] | None = None  # a hierarchical latent's groups, in the flat z's order

    @property
    def warning(self) -> str | None:
        """A plain-words warning when units have collapsed, else None."""
        inactive = np.flatnonzero(~self.active)
        if inactive.size == 0:
            return None
        if inactive.size == self.active.size:
            return (
                "Posterior collapse: no latent unit is active; q(z|x) barely depends on x, "
                "so the decoder models the data without using z."
            )
        return (
            f"{inactive.size} of {self.active.size} latent units are inactive (posterior collapse): "
            f"units {', '.join(map(str, inactive.tolist()))} have Var_x(E_q[z]) <= {self.threshold}; "
            "their KL is near 0 and they carry no information about x."
        )


def _log_gaussians(z: torch.Tensor, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor:
    """log N(z_i; mean_n, diag var_n) for every pair: ``[I, L] x [N, L] -> [I, N]``, by matrix products."""
    precision = 1 / variances
    quadratic = (z * z) @ precision.T - 2 * z @ (means * precision).T + numerics.tree_sum(means * means * precision)
    return -0.5 * (quadratic + numerics.tree_sum(numerics.log(variances)) + z.shape[1] * _LOG_2PI)


def mutual_information(means: np.ndarray, variances: np.ndarray, seed: int = 0) -> float:
    """I(x; z) under q, with one z_i ~ q(z|x_i) per point (the evaluation's sample 0) and q(z) over all N points."""
    mu = torch.as_tensor(means, dtype=torch.float64)
    var = torch.as_tensor(variances, dtype=torch.float64)
    n, latent = mu.shape
    eps = standard_normal(seed, np.arange(n), 0, 1, latent)[:, 0]
    z = mu + var.sqrt() * eps
    log_q_own = Independent(Normal(mu, var.sqrt()), 1).log_prob(z)
    terms = []
    for first in range(0, n, _CHUNK):
        rows = slice(first, first + _CHUNK)
        log_aggregate = torch.full((z[rows].shape[0],), -math.inf, dtype=torch.float64)
        for inner in range(0, n, _CHUNK):
            cols = slice(inner, inner + _CHUNK)
            log_aggregate = numerics.logaddexp(log_aggregate, numerics.logsumexp(_log_gaussians(z[rows], mu[cols], var[cols])))
        terms.append((log_q_own[rows] - (log_aggregate - math.log(n))).numpy())
    return exact_mean(np.concatenate(terms))


def latent_health(
    means: np.ndarray, variances: np.ndarray, kl: np.ndarray, prior: Prior, seed: int = 0, discrete: str | None = None
) -> LatentHealth:
    """Latent health from the encoder's q(z|x) over a data set.

    Args:
        means, variances: ``[N, L]`` the parameters of q(z|x_n) (its mean and variance per unit).
        kl: ``[N]`` KL(q(z|x_n) || p(z)) (analytic or Monte Carlo, as evaluated).
        prior: the model's prior.
        seed: the evaluation's seed; z_i is its sample 0 of point i.
        discrete: ``categorical`` (z one-hot: ``means`` are q's probabilities) or ``bernoulli`` (binary units:
            ``means`` are each unit's probability of 1): I(x; z) summed exactly over z's values
            (``discrete_information``); None for a continuous z (one Gaussian draw per point).
    """
    mu = torch.as_tensor(means, dtype=torch.float64)
    var = torch.as_tensor(variances, dtype=torch.float64)
    activity = np.array([exact_variance(column) for column in np.asarray(means, dtype=np.float64).T])
    if discrete is None:
        information = mutual_information(means, variances, seed)
    else:
        information = discrete_information(means, discrete)
    mean_kl = exact_mean(kl)
    kl_per_dim = prior.kl_per_dim(mu, var)
    return LatentHealth(
        kl_per_dim=None if kl_per_dim is None else np.array([exact_mean(column) for column in kl_per_dim.numpy().T]),
        activity=activity,
        active=activity > ACTIVE_THRESHOLD,
        mutual_information=information,
        mean_kl=mean_kl,
        aggregate_kl=mean_kl - information,
        max_information=math.log(mu.shape[0]),
    )



MAX_BINARY_UNITS = 16  # binary units whose 2^d joint values discrete_information sums over


def discrete_information(means: np.ndarray, family: str) -> float:
    """I(x; z) under q for a discrete z, exactly: (1/N) Σ_n Σ_z q(z|x_n) [log q(z|x_n) - log q(z)], q(z) the mean
    of q(z|x_n) over the N points, summed over every value of z (K one-hot values; 2^d binary vectors, up to
    ``MAX_BINARY_UNITS`` units, in blocks of values). NaN past that: not estimated."""
    q = torch.as_tensor(means, dtype=torch.float64).clamp(0.0, 1.0)
    n, units = q.shape
    if family == "categorical":
        log_q = numerics.log(q)
        log_aggregate = numerics.log(torch.as_tensor([exact_mean(column) for column in q.numpy().T]))
        terms = torch.where(q > 0, q * (log_q - log_aggregate), 0.0)
        return exact_mean(numerics.tree_sum(terms).numpy())
    if units > MAX_BINARY_UNITS:
        return math.nan
    log_on, log_off = numerics.log(q), numerics.log(1 - q)
    total = np.zeros(n)
    values = ((torch.arange(2**units)[:, None] >> torch.arange(units)) & 1).to(torch.float64)  # every binary z, [2^d, d]
    for first in range(0, values.shape[0], _CHUNK):
        z = values[first : first + _CHUNK]  # [M, d]
        log_joint = numerics.tree_sum(torch.where(z[None] > 0, log_on[:, None], log_off[:, None]))  # [N, M]
        joint = numerics.exp(log_joint)
        log_aggregate = numerics.log(torch.as_tensor([exact_mean(column) for column in joint.numpy().T]))
        total += numerics.tree_sum(torch.where(joint > 0, joint * (log_joint - log_aggregate), 0.0)).numpy()
    return exact_mean(total)


def group_health(health: LatentHealth, groups: Any) -> LatentHealth:
    """``health`` with the groups of a hierarchical latent: each one's active units, and its KL over the data
    set from ``groups`` (an ``estimators.importance.groups.GroupKL``: names, units, per-point KL and errors)."""
    found = []
    for name, (start, stop) in zip(groups.names, groups.units, strict=True):
        kl = stderr = kind = None
        if groups.kl is not None:
            kl = exact_mean(groups.kl[name])
            stderr = math.sqrt(math.fsum(np.square(groups.kl_stderr[name], dtype=np.float64))) / groups.kl[name].size
            kind = groups.kinds[name]
        found.append(GroupHealth(name, (start, stop), int(health.active[start:stop].sum()), kl, stderr, kind))
    return replace(health, groups=tuple(found))
