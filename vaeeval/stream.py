"""Results as JSON lines: streamed as computed, resumed after a crash, sharded, merged.

A results file (schema ``vaeeval.elbo-stream/1``) is a header line (``"kind":
"header"``: model, data, settings, scoring, and the shard if any), one line per
point with exactly the keys of an entry of ``points`` in ``vaeeval elbo --json``,
written and flushed batch by batch, and a final summary line (``"kind":
"summary"``). Every point's numbers depend only on the seed and its index, so a
run resumed from its file, or shards merged, give the numbers of one
uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from vaeeval.data import domain_from_spec
from vaeeval.errors import DataError, VaeevalError
from vaeeval.evaluate import Evaluation, PointResults, Settings, summarize
from vaeeval.scoring import Scoring

STREAM_SCHEMA = "vaeeval.elbo-stream/1"
_IDENTITY_SETTINGS = ("samples", "seed")  # the settings that change the numbers


@dataclass(frozen=True)
class Shard:
    """Points ``start .. stop-1``: shard ``index`` of ``count`` equal contiguous slices."""

    index: int
    count: int
    start: int
    stop: int

    @classmethod
    def of(cls, index: int, count: int, n: int) -> Shard:
        if not 0 <= index < count:
            raise VaeevalError(f"--shard {index}/{count}: the index must be between 0 and {count - 1}")
        return cls(index, count, index * n // count, (index + 1) * n // count)

    @classmethod
    def parse(cls, text: str, n: int) -> Shard:
        """``i/n`` -> the shard."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise VaeevalError(f"--shard {text!r}: write it as i/n, e.g. 0/4") from None
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

    @property
    def shard(self) -> dict[str, int] | None:
        return self.header.get("shard")


def header_record(
    evaluation_settings: Settings,
    scoring: Scoring,
    kl_kind: str,
    domain: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    shard: Shard | None = None,
) -> dict[str, Any]:
    """The first line of a results file."""
    return {
        "kind": "header",
        "schema": STREAM_SCHEMA,
        "model": model,
        "data": data,
        "settings": {
            "samples": evaluation_settings.samples,
            "seed": evaluation_settings.seed,
            "batch_size": evaluation_settings.batch_size,
            "chunk_size": evaluation_settings.chunk_size,
            "device": evaluation_settings.device,
        },
        "scoring": {
            "measure": scoring.measure,
            "levels": scoring.levels,
            "data_levels": scoring.data_levels,
            "note": scoring.note,
        },
        "kl_kind": kl_kind,
        "domain": domain,
        "shard": None if shard is None else shard.to_record(),
    }


def identity(header: dict[str, Any]) -> dict[str, Any]:
    """What must agree for two files to hold points of the same run (all but the shard)."""
    return {
        "model": (header["model"].get("digest"), header["model"].get("arch"), json.dumps(header["model"]["likelihood"], sort_keys=True)),
        "data": (header["data"].get("digest"), header["data"]["n"]),
        "settings": tuple(header["settings"][key] for key in _IDENTITY_SETTINGS),
        "scoring": (header["scoring"]["measure"], header["scoring"]["levels"]),
    }


def describe_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """In words, how two headers' identities differ; None when they agree."""
    first, second = identity(a), identity(b)
    words = {"model": "the model", "data": "the data", "settings": "the samples or seed", "scoring": "the scoring"}
    for key, word in words.items():
        if first[key] != second[key]:
            return f"{word} differ ({first[key]} vs {second[key]})" if key != "model" else f"{word} differs"
    return None


class ResultsWriter:
    """Appends JSON lines to a results file, flushing after every batch."""

    def __init__(self, handle: TextIO) -> None:
        self.handle = handle

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self.handle.write(json.dumps(record, allow_nan=False) + "\n")
        self.handle.flush()


def read_stream(path: str | Path, *, repair: bool = False) -> StoredRun:
    """Read a results file; with ``repair``, cut off a last line a crash left half written.

    Raises:
        DataError: missing, not a results file, or lines that are not JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except OSError as error:
        raise DataError(path, f"cannot be read ({error.strerror or error})") from None
    complete, _, tail = raw.rpartition(b"\n")
    if tail and repair:
        with path.open("r+b") as handle:
            handle.truncate(len(complete) + 1 if complete else 0)
    lines = (complete + b"\n").decode("utf-8", errors="replace").splitlines() if complete else []
    if not repair and tail:
        lines.append(tail.decode("utf-8", errors="replace"))
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(path, f"line {number} is not JSON; not a vaeeval results file") from None
    if not records or records[0].get("kind") != "header" or records[0].get("schema") != STREAM_SCHEMA:
        raise DataError(path, f"not a vaeeval results file (its first line is no {STREAM_SCHEMA} header)")
    summary = next((r for r in records[1:] if r.get("kind") == "summary"), None)
    return StoredRun(path, records[0], [r for r in records[1:] if "kind" not in r], summary)


def read_results(path: str | Path) -> StoredRun:
    """A results file, or an ``elbo --json`` document read as one.

    Raises:
        DataError: neither.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(path, "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return read_stream(path)
    except OSError as error:
        raise DataError(path, f"cannot be read ({error.strerror or error})") from None
    if not isinstance(document, dict) or document.get("schema") != "vaeeval.elbo/1":
        if isinstance(document, dict) and document.get("schema") == STREAM_SCHEMA:
            return read_stream(path)  # a results file holding only its header
        raise DataError(path, "neither a vaeeval.elbo/1 document nor a vaeeval results file")
    summary = document["summary"]
    header = {
        "kind": "header",
        "schema": STREAM_SCHEMA,
        "model": document["model"],
        "data": document["data"],
        "settings": document["settings"],
        "scoring": summary["scoring"],
        "kl_kind": summary["kl_kind"],
        "domain": document["data"]["domain"],
        "shard": None,
    }
    return StoredRun(path, header, document["points"], {"kind": "summary", "summary": summary})


def _column(records: Sequence[dict[str, Any]], name: str, default: float = math.nan) -> np.ndarray:
    return np.array([default if r.get(name) is None else r[name] for r in records], dtype=np.float64)


def points_from_records(records: Sequence[dict[str, Any]]) -> PointResults:
    """Per-point results from point records (``null`` numbers become NaN), sorted by index."""
    records = sorted(records, key=lambda r: r["index"])
    return PointResults(
        index=np.array([r["index"] for r in records], dtype=np.int64),
        elbo=_column(records, "elbo"),
        recon=_column(records, "recon"),
        kl=_column(records, "kl"),
        iwae=_column(records, "iwae"),
        kl_stderr=_column(records, "kl_stderr", 0.0),
        elbo_stderr=_column(records, "elbo_stderr"),
        iwae_stderr=_column(records, "iwae_stderr"),
        ess=_column(records, "ess"),
        khat=_column(records, "khat"),
        unreliable=np.array([bool(r["unreliable"]) for r in records]),
    )


def evaluation_from_records(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> Evaluation:
    """The evaluation the records of one run (or all its shards) add up to."""
    settings = Settings(**header["settings"])
    scoring = Scoring(**header["scoring"])
    points = points_from_records(records)
    dims = header["model"]["dims"]
    return Evaluation(
        points=points,
        summary=summarize(points, dims, settings.samples, scoring.dequantization_offset(dims)),
        settings=settings,
        scoring=scoring,
        kl_kind=header["kl_kind"],
        domain=domain_from_spec(header["domain"]),
    )


def check_complete(runs: Sequence[StoredRun]) -> list[dict[str, Any]]:
    """Every point of the data exactly once across ``runs`` (all of one run); the point records, by index.

    Raises:
        VaeevalError: files of different runs, a point twice, or points missing.
    """
    first = runs[0]
    for run in runs[1:]:
        difference = describe_difference(first.header, run.header)
        if difference:
            raise VaeevalError(f"{run.path} is not part of the run of {first.path}: {difference}")
    records: dict[int, dict[str, Any]] = {}
    for run in runs:
        for record in run.points:
            if record["index"] in records:
                raise VaeevalError(f"{run.path}: point {record['index']} is in more than one file")
            records[record["index"]] = record
    n = first.header["data"]["n"]
    missing = sorted(set(range(n)) - set(records))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise VaeevalError(f"the files hold {len(records)} of {n} points; missing {shown} (a shard not finished or not given)")
    return [records[index] for index in range(n)]
