"""Results as JSON lines: streamed as computed, resumed after a crash, sharded, merged.

A results file (schema ``vaeeval.elbo-stream/1``, or ``vaeeval.ais-stream/1`` for
AIS) is a header line (``"kind": "header"``: model, data, settings, scoring, and the
shard if any), one line per point with exactly the keys of an entry of ``points`` in
the command's ``--json`` document, written and flushed batch by batch, and a final
summary line (``"kind": "summary"``). Every point's numbers depend only on the seed
and its index, so a run resumed from its file, or shards merged, give the numbers of
one uninterrupted run, bit for bit. ``ResultsFormat`` says, for each kind of run, how
its lines are made and read back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from vaeeval.errors import DataError, VaeevalError, listing, option
from vaeeval.output.records import (
    ais_evaluation_from_records,
    ais_point_records,
    ais_settings_record,
    ais_summary_record,
    cost_record,
    data_record,
    evaluation_from_records,
    model_record,
    point_records,
    scoring_record,
    settings_record,
    summary_record,
)
from vaeeval.output.schemas import AIS_SCHEMA, AIS_STREAM_SCHEMA, ELBO_SCHEMA, STREAM_SCHEMA
from vaeeval.results import Scoring, Settings

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

    @property
    def shard(self) -> dict[str, int] | None:
        return self.header.get("shard")


def header_record(
    settings: Settings,
    scoring: Scoring,
    kl_kind: str,
    domain: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    shard: Shard | None = None,
) -> dict[str, Any]:
    """The first line of a results file.

    Args:
        settings, scoring, kl_kind: the evaluation's.
        domain: the data's detected domain, as its spec.
        model, data: ``model_record`` and ``data_record`` of what is evaluated.
        shard: the slice of the points this file holds, if any.
    """
    return {
        "kind": "header",
        "schema": STREAM_SCHEMA,
        "model": model,
        "data": data,
        "settings": settings_record(settings),
        "scoring": scoring_record(scoring),
        "kl_kind": kl_kind,
        "domain": domain,
        "shard": None if shard is None else shard.to_record(),
    }


def ais_header_record(evaluator: Any, shard: Shard | None = None) -> dict[str, Any]:
    """The first line of an AIS results file, for an ``ais.AISEvaluator``."""
    return {
        "kind": "header",
        "schema": AIS_STREAM_SCHEMA,
        "model": model_record(evaluator.model),
        "data": data_record(evaluator.dataset),
        "settings": ais_settings_record(evaluator.settings),
        "scoring": scoring_record(evaluator.scoring),
        "domain": evaluator.importance.domain.to_spec(),
        "cost": cost_record(evaluator.cost),
        "shard": None if shard is None else shard.to_record(),
    }


def _elbo_header(evaluator: Any, shard: Shard | None = None) -> dict[str, Any]:
    return header_record(
        evaluator.settings,
        evaluator.scoring,
        evaluator.model.prior.kl_kind,
        evaluator.domain.to_spec(),
        model_record(evaluator.model),
        data_record(evaluator.dataset),
        shard,
    )


@dataclass(frozen=True)
class ResultsFormat:
    """One kind of results file: how its lines are made from a run's results, and read back.

    Attributes:
        schema: the header's schema (``vaeeval.elbo-stream/1``).
        document: the ``--json`` document the file stands for (``vaeeval.elbo/1``).
        header: (evaluator, shard) -> the header line.
        points: (evaluator, per-point results) -> their point lines.
        summary: evaluation -> the summary record.
        evaluation: (header, point lines) -> the evaluation they add up to.
    """

    schema: str
    document: str
    header: Callable[[Any, Shard | None], dict[str, Any]]
    points: Callable[[Any, Any], list[dict[str, Any]]]
    summary: Callable[[Any], dict[str, Any]]
    evaluation: Callable[[dict[str, Any], Sequence[dict[str, Any]]], Any]

    def summary_line(self, evaluation: Any) -> dict[str, Any]:
        """The last line of a finished results file."""
        return {"kind": "summary", "summary": self.summary(evaluation)}


ELBO_RESULTS = ResultsFormat(
    STREAM_SCHEMA,
    ELBO_SCHEMA,
    _elbo_header,
    lambda evaluator, points: point_records(points, evaluator.settings.samples, evaluator.model.prior.monte_carlo_kl),
    summary_record,
    evaluation_from_records,
)
AIS_RESULTS = ResultsFormat(
    AIS_STREAM_SCHEMA,
    AIS_SCHEMA,
    ais_header_record,
    lambda evaluator, points: ais_point_records(points),
    ais_summary_record,
    ais_evaluation_from_records,
)
FORMATS = {results.schema: results for results in (ELBO_RESULTS, AIS_RESULTS)}


def results_format(header: dict[str, Any]) -> ResultsFormat:
    """The format of the results file this header opens."""
    return FORMATS[header["schema"]]


def identity(header: dict[str, Any]) -> dict[str, Any]:
    """What must agree for two files to hold points of the same run (all but the shard)."""
    return {
        "kind": header["schema"],
        "model": (header["model"].get("digest"), header["model"].get("arch"), json.dumps(header["model"]["likelihood"], sort_keys=True)),
        "data": (header["data"].get("digest"), header["data"]["n"]),
        "settings": tuple(value for key, value in header["settings"].items() if key not in _HOW_NOT_WHAT),
        "scoring": (header["scoring"]["measure"], header["scoring"]["levels"]),
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
    if not records or records[0].get("kind") != "header" or records[0].get("schema") not in FORMATS:
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
    documents = {results.document: results for results in FORMATS.values()}
    if not isinstance(document, dict) or document.get("schema") not in documents:
        if isinstance(document, dict) and document.get("schema") in FORMATS:
            return read_stream(path)  # a results file holding only its header
        raise DataError(path, f"neither a {ELBO_SCHEMA} document nor a vaeeval results file")
    summary = document["summary"]
    header = {
        "kind": "header",
        "schema": documents[document["schema"]].schema,
        "model": document["model"],
        "data": document["data"],
        "settings": document["settings"],
        "scoring": summary["scoring"],
        **({"kl_kind": summary["kl_kind"]} if "kl_kind" in summary else {"cost": summary["cost"]}),
        "domain": document["data"]["domain"],
        "shard": None,
    }
    return StoredRun(path, header, document["points"], {"kind": "summary", "summary": summary})


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
        shown = listing(missing)
        raise VaeevalError(f"the files hold {len(records)} of {n} points; missing {shown} (a shard not finished or not given)")
    return [records[index] for index in range(n)]


@dataclass(frozen=True)
class MergedRun:
    """The run the files of its shards add up to."""

    header: dict[str, Any]  # the header of one unsharded run
    records: list[dict[str, Any]]  # every point once, by index
    evaluation: Any  # results.Evaluation or results.AISEvaluation


def merge_runs(runs: Sequence[StoredRun]) -> MergedRun:
    """One run from the files of its shards.

    Raises:
        VaeevalError: as ``check_complete``.
    """
    records = check_complete(runs)
    header = {**runs[0].header, "shard": None}
    return MergedRun(header, records, results_format(header).evaluation(header, records))


def write_results(path: str | Path, header: dict[str, Any], records: Sequence[dict[str, Any]], evaluation: Any) -> None:
    """Write a finished results file in one go: the header, every point, the summary."""
    with Path(path).open("w") as handle:
        ResultsWriter(handle).write([header, *records, results_format(header).summary_line(evaluation)])
