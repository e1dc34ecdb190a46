"""The results files runs write: every estimator's ``ResultsFormat`` registered, the shard a file holds,
and what must agree for two files to hold points of the same run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.annealing.results_file import AIS_RESULTS
from vaeeval.estimators.importance.results_file import ELBO_RESULTS
from vaeeval.results.formats import register
from vaeeval.results.schemas import STREAM_SCHEMA

_HOW_NOT_WHAT = ("batch_size", "chunk_size", "device")  # settings that never change a number


@dataclass(frozen=True)
class Shard:
    """Points ``start .. stop-1``: shard ``index`` of ``count`` equal contiguous slices."""

    index: int
    count: int
    start: int
    stop: int

    @classmethod
    def of(cls, index: int, count: int, n: int) -> Shard:
        if count < 1:
            raise VaeevalError(f"{option('shard')} {index}/{count}: the number of shards must be at least 1")
        if not 0 <= index < count:
            raise VaeevalError(f"{option('shard')} {index}/{count}: the index must be between 0 and {count - 1}")
        return cls(index, count, index * n // count, (index + 1) * n // count)

    @classmethod
    def parse(cls, text: str, n: int) -> Shard:
        """``i/n`` -> the shard."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise VaeevalError(f"{option('shard')} {text!r}: write it as i/n, e.g. 0/4") from None
        return cls.of(index, count, n)

    def to_record(self) -> dict[str, int]:
        return {"index": self.index, "count": self.count, "start": self.start, "stop": self.stop}


@dataclass(frozen=True)
class StoredRun:
    """What a results file (or an ``elbo --json`` document) holds."""

    path: Path
    header: dict[str, Any]
    points: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None until the run finished
    digest: Any = None  # hashlib's sha256 of the lines read (for a resumed run's writer to go on from)

    @property
    def shard(self) -> dict[str, int] | None:
        return self.header.get("shard")


# The estimators vaeeval ships: one line each.
register(ELBO_RESULTS)
register(AIS_RESULTS)


def identity(header: dict[str, Any]) -> dict[str, Any]:
    """What must agree for two files to hold points of the same run (all but the shard)."""
    return {
        "kind": header["schema"],
        "model": (header["model"].get("digest"), header["model"].get("arch"), json.dumps(header["model"]["likelihood"], sort_keys=True)),
        "data": (header["data"].get("digest"), header["data"]["n"]),
        "settings": tuple(value for key, value in header["settings"].items() if key not in _HOW_NOT_WHAT),
        "scoring": (header["scoring"]["measure"], header["scoring"]["levels"], tuple(header["scoring"].get("range", (0, 1))))
        if "scoring" in header else None,
    }


def describe_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """In words, how two headers' identities differ; None when they agree."""
    first, second = identity(a), identity(b)
    settings = "the samples or seed" if a["schema"] == STREAM_SCHEMA else "the settings"
    words = {"kind": "the kinds of run", "model": "the model", "data": "the data", "settings": settings, "scoring": "the scoring"}
    for key, word in words.items():
        if first[key] != second[key]:
            return f"{word} differ ({first[key]} vs {second[key]})" if key != "model" else f"{word} differs"
    return None

