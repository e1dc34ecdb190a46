"""Counter-based random draws keyed by (seed, point index, stream, counter).

Draw k of point i depends only on (seed, i, k), never on how points are
batched, how samples are chunked, or which process computes them: the same
seed gives the same numbers, bit for bit. Each draw hashes its counter with the
SplitMix64 finalizer (Steele, Lea & Flood 2014, the seeding generator of
java.util.SplittableRandom), takes 53 bits as a uniform on (0, 1) and, for
normal draws, maps it through the normal quantile function (``numerics.ndtri``, the
same bits on every CPU). Everything is
vectorized: no Python loop over points or samples.

Independent uses of randomness draw from separate streams (an integer mixed
into each point's key): stream 0 is the importance samples of ``evaluate``;
annealed importance sampling keys its initial states, momenta and acceptance
tests by streams of their own, and their counters by chain and step.
"""

from __future__ import annotations

import numpy as np
import torch

from vaeeval.core.numerics import ndtri

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_STREAM = np.uint64(0xD1B54A32D192ED03)  # separates the per-point key from the draw counter


def _mix(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


_SUBSTREAM = np.uint64(0x8CB92BA72F3D8DD7)  # separates streams of one point


def point_keys(seed: int, indices: np.ndarray, stream: int = 0) -> np.ndarray:
    """One 64-bit key per point: ``[B]`` uint64 from the seed, the points' indices and the stream."""
    base = _mix(np.asarray([seed], dtype=np.uint64) * _GOLDEN + _STREAM)
    keys = _mix(base ^ (np.asarray(indices, dtype=np.uint64) * _GOLDEN))
    if stream:
        with np.errstate(over="ignore"):
            keys = _mix(keys ^ (np.uint64(stream) * _SUBSTREAM))
    return keys


def uniform(seed: int, indices: np.ndarray, counters: np.ndarray, stream: int = 0) -> np.ndarray:
    """Uniform draws on (0, 1), ``[B, *counters.shape]`` float64: draw ``counters`` of each point's stream.

    Args:
        seed: a non-negative integer below 2**64.
        indices: ``[B]`` the points' indices in the data set.
        counters: which draws, non-negative integers below 2**64 (any shape).
        stream: the stream of each point to draw from.
    """
    keys = point_keys(seed, indices, stream).reshape(-1, *([1] * np.ndim(counters)))
    with np.errstate(over="ignore"):
        bits = _mix(keys + np.asarray(counters, dtype=np.uint64)[None] * _GOLDEN)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def normal(seed: int, indices: np.ndarray, counters: np.ndarray, stream: int = 0) -> torch.Tensor:
    """Standard-normal draws, ``[B, *counters.shape]`` float64 (see ``uniform``)."""
    return torch.from_numpy(ndtri(uniform(seed, indices, counters, stream)))


def standard_normal(seed: int, indices: np.ndarray, start: int, stop: int, dim: int) -> torch.Tensor:
    """Draws ``start .. stop-1`` of each point, ``[B, stop - start, dim]`` float64, iid N(0, 1).

    Args:
        seed: a non-negative integer below 2**64.
        indices: ``[B]`` the points' indices in the data set.
        start, stop: the range of sample numbers k.
        dim: numbers per sample (the latent dimension).
    """
    counters = np.arange(start * dim, stop * dim, dtype=np.uint64)
    return normal(seed, indices, counters).reshape(len(indices), stop - start, dim)
