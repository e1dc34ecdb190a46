"""Pareto-smoothed importance sampling diagnostics: the tail shape k-hat of the importance weights.

Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed importance
sampling", JMLR 25(72). The M largest weights (M = ceil(min(K/5, 3 sqrt(K))))
above the (M+1)-th are fitted with a generalized Pareto distribution by the
empirical-Bayes method of Zhang & Stephens (2009), with the usual weak prior
pulling k toward 0.5; the same computation as arviz's ``psislw``, vectorized
over points, in float64, with ``numerics``' exp, log and sums (NumPy's own change their
last bit with the CPU's vector instructions). k-hat above min(1 - 1/log10(K), 0.7) means the
importance-sampling estimate is unreliable: its variance may be infinite, and
the estimate can look fine while being badly low.

Only the M + 1 largest log-weights of each point are needed, so they are kept
while streaming over sample chunks (``top_size``).
"""

from __future__ import annotations

import math

import numpy as np

_LOG_TINY = math.log(np.finfo(float).tiny)
_EPS = np.finfo(float).eps
_PRIOR_BS, _PRIOR_K = 3.0, 10.0


def tail_size(samples: int) -> int:
    """M, the number of tail weights fitted: ceil(min(K/5, 3 sqrt(K)))."""
    return int(math.ceil(min(samples / 5.0, 3 * math.sqrt(samples))))


def top_size(samples: int) -> int:
    """How many of the largest log-weights per point ``pareto_khat`` needs: M + 1 (at most K)."""
    return min(tail_size(samples) + 1, samples)


def reliability_threshold(samples: int) -> float:
    """k-hat above this flags a point as unreliable: min(1 - 1/log10(K), 0.7)."""
    if samples <= 1:
        return -math.inf
    return min(1.0 - 1.0 / math.log10(samples), 0.7)


def gpd_fit(tails: np.ndarray) -> np.ndarray:
    """Zhang & Stephens (2009) estimate of the generalized Pareto shape k, one per row.

    Args:
        tails: ``[R, n]`` exceedances over the threshold, each row sorted ascending, n > 4.

    Returns:
        ``[R]`` the posterior-mean shape, shrunk toward 0.5 by a weak prior (as arviz).
    """
    from vaeeval.core import numerics  # torch: imported here, so that results.py imports psis without it

    rows, n = tails.shape
    m = 30 + int(n**0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b = b[None, :] / (_PRIOR_BS * tails[:, int(n / 4 + 0.5) - 1][:, None]) + 1 / tails[:, -1][:, None]  # [R, m]
    k = numerics.tree_sum(numerics.log1p(-b[:, :, None] * tails[:, None, :], numerics.log)) / n  # [R, m]
    profile = n * (numerics.log(-(b / k)) - k - 1)
    weights = 1 / numerics.tree_sum(numerics.exp(profile[:, None, :] - profile[:, :, None]))
    weights = np.where(weights >= 10 * _EPS, weights, 0.0)
    weights /= numerics.tree_sum(weights)[:, None]
    b_post = numerics.tree_sum(b * weights)
    k_post = numerics.tree_sum(numerics.log1p(-b_post[:, None] * tails, numerics.log)) / n
    return (n * k_post + _PRIOR_K * 0.5) / (n + _PRIOR_K)


def pareto_khat(top: np.ndarray, samples: int) -> np.ndarray:
    """k-hat per point from its largest log-weights.

    Args:
        top: ``[N, top_size(K)]`` the largest log-weights of each point, in any order.
        samples: K, the number of importance samples.

    Returns:
        ``[N]`` k-hat; ``inf`` when the tail is too short to fit (as arviz), ``-inf``
        when the largest M + 1 weights are all equal, the exact-posterior case
        (nothing to fit, and nothing to worry about).
    """
    from vaeeval.core import numerics

    top = np.sort(np.asarray(top, dtype=np.float64), axis=1)[:, ::-1]
    points = top.shape[0]
    khat = np.full(points, np.inf)
    tail = tail_size(samples)
    if top.shape[1] < tail + 1:
        return khat
    x = top - top[:, :1]
    cutoff = np.maximum(x[:, tail], _LOG_TINY)
    lengths = (x[:, :tail] > cutoff[:, None]).sum(axis=1)
    khat[np.all(x[:, : tail + 1] == 0, axis=1)] = -np.inf
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for n in np.unique(lengths[lengths > 4]):
            rows = np.flatnonzero(lengths == n)
            exceedances = numerics.exp(x[rows, :n]) - numerics.exp(cutoff[rows])[:, None]
            khat[rows] = gpd_fit(exceedances[:, ::-1])
    return khat
