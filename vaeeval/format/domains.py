"""Format 1's vocabulary of data domains, and finding the smallest one that holds some values.

A domain says what values a data point may take: ``binary`` (0 or 1),
``discrete`` (the grid k/(L-1) on [0, 1]), ``unit_interval``, ``real`` or
``counts`` (non-negative integers, as in single-cell RNA data). A
model may declare one (its ``data`` block); vaeeval detects one from the data,
and a discrete one decides the bins a continuous likelihood is scored on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from vaeeval.errors import SpecError
from vaeeval.format.specs import levels as levels_value

DOMAINS = ("binary", "discrete", "unit_interval", "real", "counts")
GRID_TOLERANCE = 1e-4  # in units of one grid step: float32 k/(L-1) is well within it
_SCAN_ELEMENTS = 1 << 22  # elements per block when scanning an array


@dataclass(frozen=True)
class Domain:
    """What values data takes (format 1's ``data.domain``)."""

    kind: str
    levels: int | None = None

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the (finite) values of ``x`` outside this domain."""
        if self.kind == "binary":
            return (x != 0) & (x != 1)
        if self.kind == "real":
            return np.zeros(x.shape, dtype=bool)
        if self.kind == "counts":
            return (x < 0) | (x != np.floor(x))
        outside = (x < 0) | (x > 1)
        if self.kind == "discrete":
            steps = np.asarray(x, dtype=np.float64) * (self.levels - 1)
            outside |= np.abs(steps - np.round(steps)) > GRID_TOLERANCE
        return outside

    def describe(self) -> str:
        """In words, for messages and tables."""
        return {
            "binary": "binary data (0 or 1)",
            "discrete": f"discrete data on {self.levels} levels k/{(self.levels or 2) - 1}",
            "unit_interval": "data in [0, 1]",
            "real": "real-valued data",
            "counts": "count data (non-negative integers)",
        }[self.kind]

    @property
    def grid_levels(self) -> int | None:
        """The number of values k/(L-1) this domain allows, for binary and discrete data."""
        return 2 if self.kind == "binary" else self.levels

    def to_spec(self) -> dict[str, Any]:
        """The format-1 ``data`` block."""
        return {"domain": self.kind} if self.levels is None else {"domain": self.kind, "levels": self.levels}


def domain_from_spec(spec: Any) -> Domain | None:
    """Parse a format-1 ``data`` block (``None`` when absent).

    Raises:
        SpecError: not an object, unknown domain, or ``discrete`` without valid ``levels``.
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "domain" not in spec:
        raise SpecError(f"\"data\" must be an object with a \"domain\", found {spec!r}")
    kind = spec["domain"]
    if kind not in DOMAINS:
        raise SpecError(f"data domain {kind!r} is not one of {', '.join(DOMAINS)}")
    if kind != "discrete":
        return Domain(kind)
    return Domain(kind, levels_value(spec.get("levels"), 'data domain "discrete"'))


def row_blocks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` blocks of a (possibly memory-mapped) array, a few million elements each."""
    rows = max(1, _SCAN_ELEMENTS // max(1, math.prod(array.shape[1:])))
    for start in range(0, array.shape[0], rows):
        yield start, np.asarray(array[start : start + rows])


def detect_domain(array: np.ndarray) -> Domain:
    """The smallest domain (binary, discrete, unit_interval, counts, real) holding every value of ``array``."""
    detector = DomainDetector()
    for _, block in row_blocks(array):
        detector.update(block)
    return detector.domain()


class DomainDetector:
    """Finds the smallest domain holding every value seen, block by block.

    Discrete data is recognized on grids of up to ``MAX_LEVELS`` levels: the
    distinct values (at most that many are kept) are read as fractions, and the
    grid is the least common multiple of their denominators.
    """

    MAX_LEVELS = 4097

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf
        self.values: np.ndarray | None = np.empty(0)
        self.integers = True

    def update(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        self.low, self.high = min(self.low, float(block.min())), max(self.high, float(block.max()))
        if self.integers and block.dtype.kind == "f":
            self.integers = bool(np.all(block == np.floor(block)))
        if self.values is not None:
            self.values = np.union1d(self.values, np.unique(block).astype(np.float64))
            if self.values.size > self.MAX_LEVELS:
                self.values = None  # too many distinct values for a grid

    def domain(self) -> Domain:
        if self.low < 0 or self.high > 1:
            return Domain("counts") if self.low >= 0 and self.integers else Domain("real")
        levels = None if self.values is None else grid_levels(self.values, self.MAX_LEVELS)
        if levels is None:
            return Domain("unit_interval")
        return Domain("binary") if levels == 2 else Domain("discrete", levels)


def grid_levels(values: np.ndarray, max_levels: int) -> int | None:
    """The smallest L <= max_levels with every value (in [0, 1]) on the grid k/(L-1), or None."""
    step = 1
    for value in values:
        step = math.lcm(step, Fraction(float(value)).limit_denominator(max_levels - 1).denominator)
        if step > max_levels - 1:
            return None
    scaled = values * step
    if np.any(np.abs(scaled - np.round(scaled)) > GRID_TOLERANCE):
        return None
    return step + 1
