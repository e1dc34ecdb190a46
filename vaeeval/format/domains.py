"""Format 1's vocabulary of data domains, the grids discrete data lies on, and finding the smallest domain that holds some values.

A domain says what values a data point may take: ``binary`` (0 or 1),
``discrete`` (a grid of L levels, k/(L-1) on [0, 1] unless the model says
another range), ``unit_interval``, ``real`` or ``counts`` (non-negative
integers, as in single-cell RNA data). A model may declare one (its ``data``
block); vaeeval detects one from the data, and a discrete one decides the bins
a continuous likelihood is scored on.

A ``Grid`` is such a set of values, low + k (high - low)/(L - 1): 8-bit images
are 256 levels on [0, 1], on [-1, 1] (2k/255 - 1, as diffusers holds them) or
on [0, 255] (the integers themselves).
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
BYTE_LEVELS = 256  # integers 0..255 under a continuous likelihood are read as 8-bit levels


def number(value: float) -> str:
    """A range end as people write it: ``0``, ``-1``, ``255``, ``0.5``."""
    return f"{value:.6g}"


def describe_range(low: float, high: float) -> str:
    return f"[{number(low)}, {number(high)}]"


@dataclass(frozen=True)
class Grid:
    """The L values low + k (high - low)/(L - 1), k = 0..L-1: what discrete data is scored on.

    The bin of a value is the interval of one step around it, the two outermost
    bins reaching to the ends of the likelihood's support (FORMAT.md, "Data").
    On [0, 1] every formula here reduces, operation for operation, to k/(L-1).
    """

    levels: int
    low: float = 0.0
    high: float = 1.0

    @property
    def unit(self) -> bool:
        """On [0, 1], format 1's own grid."""
        return self.low == 0.0 and self.high == 1.0

    @property
    def span(self) -> float:
        return self.high - self.low

    @property
    def step(self) -> float:
        return self.span / (self.levels - 1)

    def steps(self, x: np.ndarray) -> np.ndarray:
        """Each value's position on the grid in steps (an integer k for a value on it)."""
        return (np.asarray(x, dtype=np.float64) - self.low) * ((self.levels - 1) / self.span)

    def nearest(self, x: Any) -> Any:
        """The level k nearest each value of ``x`` (numpy or torch), as a float: round(x (L-1)) on [0, 1]."""
        return ((x - self.low) * ((self.levels - 1) / self.span)).round()

    def values(self, k: Any) -> Any:
        """The values of levels ``k`` (numpy or torch), k/(L-1) on [0, 1]."""
        return k / (self.levels - 1) * self.span + self.low

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the values of ``x`` not on this grid."""
        steps = self.steps(x)
        return (x < self.low) | (x > self.high) | (np.abs(steps - np.round(steps)) > GRID_TOLERANCE)

    def refined_by(self, levels: int) -> bool:
        """Whether ``levels`` levels on the same range hold every value of this grid."""
        return (levels - 1) % (self.levels - 1) == 0

    def describe(self) -> str:
        """``256 levels k/255`` or ``256 levels on [-1, 1], step 0.00784314``."""
        if self.unit:
            return f"{self.levels} levels k/{self.levels - 1}"
        return f"{self.levels} levels on {describe_range(self.low, self.high)}, step {number(self.step)}"

    @property
    def range(self) -> list[float]:
        return [self.low, self.high]


@dataclass(frozen=True)
class Domain:
    """What values data takes (format 1's ``data.domain``, with the optional ``range`` of a discrete grid)."""

    kind: str
    levels: int | None = None
    low: float = 0.0  # the range of a discrete grid (high: the largest value of detected counts)
    high: float = 1.0

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the (finite) values of ``x`` outside this domain."""
        if self.kind == "binary":
            return (x != 0) & (x != 1)
        if self.kind == "real":
            return np.zeros(x.shape, dtype=bool)
        if self.kind == "counts":
            return (x < 0) | (x != np.floor(x))
        if self.kind == "discrete":
            return self.grid.outside(x)
        return (x < 0) | (x > 1)

    def describe(self) -> str:
        """In words, for messages and tables."""
        if self.kind == "discrete":
            return f"discrete data on {self.grid.describe()}"
        return {
            "binary": "binary data (0 or 1)",
            "unit_interval": "data in [0, 1]",
            "real": "real-valued data",
            "counts": "count data (non-negative integers)",
        }[self.kind]

    @property
    def grid(self) -> Grid | None:
        """The values this domain allows, for binary and discrete data."""
        if self.kind == "binary":
            return Grid(2)
        return Grid(self.levels, self.low, self.high) if self.kind == "discrete" else None

    @property
    def grid_levels(self) -> int | None:
        grid = self.grid
        return None if grid is None else grid.levels

    @property
    def bounded(self) -> tuple[float, float] | None:
        """The range every value lies in, where the domain has one (binary, discrete, unit_interval)."""
        if self.kind in ("binary", "unit_interval", "discrete"):
            return self.low, self.high
        return None

    def byte_grid(self) -> Grid | None:
        """Integers in 0..255 (counts no larger) read as 8-bit levels, for a continuous likelihood."""
        if self.kind == "counts" and self.high <= BYTE_LEVELS - 1:
            return Grid(BYTE_LEVELS, 0.0, float(BYTE_LEVELS - 1))
        return None

    def to_spec(self) -> dict[str, Any]:
        """The format-1 ``data`` block."""
        if self.kind != "discrete":
            return {"domain": self.kind}
        spec: dict[str, Any] = {"domain": self.kind, "levels": self.levels}
        return spec if self.grid.unit else {**spec, "range": self.grid.range}


def domain_from_spec(spec: Any) -> Domain | None:
    """Parse a format-1 ``data`` block (``None`` when absent).

    Raises:
        SpecError: not an object, unknown domain, ``discrete`` without valid ``levels``, a ``range``
            that is not two finite numbers low < high, or one on another domain.
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "domain" not in spec:
        raise SpecError(f"\"data\" must be an object with a \"domain\", found {spec!r}")
    kind = spec["domain"]
    if kind not in DOMAINS:
        raise SpecError(f"data domain {kind!r} is not one of {', '.join(DOMAINS)}")
    if kind != "discrete":
        if "range" in spec:
            raise SpecError(f"data: \"range\" belongs to a \"discrete\" domain, not {kind!r}")
        return Domain(kind)
    levels = levels_value(spec.get("levels"), 'data domain "discrete"')
    low, high = data_range(spec.get("range", [0.0, 1.0]))
    return Domain(kind, levels, low, high)


def data_range(value: Any) -> tuple[float, float]:
    """A ``range`` [low, high]: two finite numbers, low < high.

    Raises:
        SpecError: anything else.
    """
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in value)
        or not value[0] < value[1]
    ):
        raise SpecError(f"data: \"range\" must be [low, high], two finite numbers with low < high, found {value!r}")
    return float(value[0]), float(value[1])


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

    Discrete data is recognized on grids of up to ``MAX_LEVELS`` levels over
    [0, 1], or over [-1, 1] when a value is negative: the distinct values (at
    most that many are kept) are read as fractions of the range, and the grid is
    the least common multiple of their denominators. Other grids are named by
    ``--discretize L --range LO,HI`` (or the model's ``data.range``).
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
        if -1 <= self.low < 0 and self.high <= 1:
            levels = None if self.values is None else grid_levels((self.values + 1) / 2, self.MAX_LEVELS)
            return Domain("real") if levels is None else Domain("discrete", levels, -1.0, 1.0)
        if self.low < 0 or self.high > 1:
            return Domain("counts", high=self.high) if self.low >= 0 and self.integers else Domain("real")
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
