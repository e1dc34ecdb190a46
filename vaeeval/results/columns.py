"""An estimator's per-point result columns, declared once: its point records, their JSON Schema and their checks.

An estimator says which numbers it reports per point (``PointColumns``); from that one
declaration come the point objects of its ``--json`` document and of its results
file's lines (``records``), the way back to arrays (``arrays``), the JSON Schema of a
point (``schema``) and what reading a results file checks of each point line
(``numbers``, ``maybe_numbers``, ``flags``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

NUMBER = "number"  # always a finite number
MAYBE_NUMBER = "maybe_number"  # a finite number, or null where it is undefined (a standard error from one sample)
FLAG = "flag"  # true or false
COUNT = "count"  # a whole number, at least 0 (a sequence's tokens)
_SCHEMAS = {NUMBER: {"type": "number"}, MAYBE_NUMBER: {"type": ["number", "null"]}, FLAG: {"type": "boolean"},
            COUNT: {"type": "integer", "minimum": 0}}
INDEX_SCHEMA = {"type": "integer", "minimum": 0}


def finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: an undefined number (a standard error from one sample) is null."""
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Column:
    """One number (or flag) per point.

    Attributes:
        name: its key in a point object, and the attribute of the estimator's per-point results.
        kind: ``NUMBER``, ``MAYBE_NUMBER``, ``FLAG`` or ``COUNT``.
        meaning: what it is, in a phrase (the schema's description).
        optional: reported only by some runs (the KL's standard error, when the KL is a Monte Carlo estimate).
    """

    name: str
    kind: str
    meaning: str
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _SCHEMAS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is none of {', '.join(_SCHEMAS)}")


@dataclass(frozen=True)
class PointColumns:
    """The columns of an estimator's per-point results, in the order its point objects list them."""

    columns: tuple[Column, ...]

    def names(self, *, optional: bool = True) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns if optional or not column.optional)

    def _of(self, kind: str) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns if column.kind == kind)

    @property
    def numbers(self) -> tuple[str, ...]:
        return self._of(NUMBER)

    @property
    def maybe_numbers(self) -> tuple[str, ...]:
        return self._of(MAYBE_NUMBER)

    @property
    def optional(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns if column.optional)

    @property
    def flags(self) -> tuple[str, ...]:
        return self._of(FLAG)

    @property
    def counts(self) -> tuple[str, ...]:
        return self._of(COUNT)

    def records(self, index: Sequence[int], values: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
        """One object per point: ``index``, then every column ``values`` holds, in declared order.

        Numbers that are not finite become null; an optional column absent from ``values`` is left out.
        """
        present = [column for column in self.columns if column.name in values or not column.optional]
        lists = {column.name: list(values[column.name]) for column in present}
        rows = []
        for row, point in enumerate(index):
            record: dict[str, Any] = {"index": int(point)}
            for column in present:
                value = lists[column.name][row]
                record[column.name] = (
                    bool(value) if column.kind == FLAG else int(value) if column.kind == COUNT else finite(float(value))
                )
            rows.append(record)
        return rows

    def arrays(self, records: Sequence[dict[str, Any]], defaults: Mapping[str, float] | None = None) -> dict[str, np.ndarray]:
        """The columns of point objects, sorted by index: ``index`` (int64), numbers (float64, null as NaN
        or as ``defaults[name]``), flags (bool); an optional column no record holds is its default, an optional
        flag some record lacks is left out."""
        records = sorted(records, key=lambda record: record["index"])
        defaults = defaults or {}
        arrays = {"index": np.array([record["index"] for record in records], dtype=np.int64)}
        for column in self.columns:
            if column.kind == FLAG:
                if column.optional and any(column.name not in record for record in records):
                    continue
                arrays[column.name] = np.array([bool(record[column.name]) for record in records])
            else:
                fill = defaults.get(column.name, math.nan)
                arrays[column.name] = np.array(
                    [fill if record.get(column.name) is None else record[column.name] for record in records], dtype=np.float64
                )
        return arrays

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of one point object."""
        required = {"index": INDEX_SCHEMA} | {c.name: _SCHEMAS[c.kind] for c in self.columns if not c.optional}
        optional = {c.name: _SCHEMAS[c.kind] for c in self.columns if c.optional}
        return {"type": "object", "required": list(required), "properties": {**required, **optional}}
