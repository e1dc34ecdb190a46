"""Data in other units than the model's: the range a model expects, and ``--rescale``'s linear map onto it.

8-bit pixels are 0..255 as stored, [0, 1] or [-1, 1] as models are trained on them.
Data outside the range a model expects (``Model.expected_range``) is refused in one
line naming both ranges and the ``--rescale`` that maps one onto the other; a
``Rescaled`` array applies that map as each batch is read.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vaeeval.errors import DataError, option
from vaeeval.format.domains import BYTE_LEVELS, DomainDetector, describe_range, number

RANGE_TOLERANCE = 1e-6  # of the range's width: float32 rounding of values at its ends


def outside(block: np.ndarray, low: float, high: float) -> np.ndarray:
    """Boolean mask of the values of ``block`` outside [low, high] (by more than float32 rounding)."""
    slack = RANGE_TOLERANCE * (high - low)
    return (block < low - slack) | (block > high + slack)


def range_message(first: str, detector: DomainDetector, expected: tuple[float, float, str], array: Any) -> str:
    """One line: the first value outside, both ranges, and the ``--rescale`` that maps the data's onto the model's."""
    low, high, why = expected
    span = describe_range(detector.low, detector.high)
    if isinstance(array, Rescaled):
        return (f"{first}: the values, rescaled from {describe_range(*array.source)} by {option('rescale')}, span {span}, "
                f"outside the model's {describe_range(low, high)} ({why})")
    message = f"{first}: the values span {span}, outside the model's {describe_range(low, high)} ({why})"
    source = other_units(detector)
    if source is None:
        return message
    return (f"{message}; if they are the same data in other units, {option('rescale')} {number(source[0])},{number(source[1])} "
            f"maps {describe_range(*source)} onto {describe_range(low, high)}")


def other_units(detector: DomainDetector) -> tuple[float, float] | None:
    """The range data in one of the usual other units spans: 8-bit integers 0..255, or [-1, 1]."""
    if detector.integers and 0 <= detector.low and BYTE_LEVELS // 2 <= detector.high <= BYTE_LEVELS - 1:
        return 0.0, float(BYTE_LEVELS - 1)
    if -1 <= detector.low < 0 and detector.high <= 1:
        return -1.0, 1.0
    return None



class Rescaled:
    """An array read through the linear map of [low, high] onto [to_low, to_high], in float64 and then float32.

    Enough of ``np.ndarray`` for vaeeval's data, as ``h5ad.Rows``: ``shape``, ``dtype``,
    ``ndim``, ``size``, ``len`` and indexing by a slice or by rows, each giving a dense array.
    """

    def __init__(self, array: Any, source: tuple[float, float], target: tuple[float, float]) -> None:
        if not (math.isfinite(source[0]) and math.isfinite(source[1]) and source[0] < source[1]):
            raise DataError(None, f"{option('rescale')} {source[0]:g},{source[1]:g}: needs two finite numbers LO < HI")
        self.array, self.source, self.target = array, (float(source[0]), float(source[1])), (float(target[0]), float(target[1]))
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, index: Any) -> np.ndarray:
        (low, high), (to_low, to_high) = self.source, self.target
        values = np.asarray(self.array[index], dtype=np.float64)
        return ((values - low) / (high - low) * (to_high - to_low) + to_low).astype(np.float32)

    def describe(self) -> str:
        return f"rescaled from {describe_range(*self.source)} onto {describe_range(*self.target)}"
