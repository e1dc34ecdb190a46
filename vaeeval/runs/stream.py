"""Results as JSON lines: streamed as computed, resumed after a crash, sharded, merged.

A results file (schema ``vaeeval.elbo-stream/1``, or ``vaeeval.ais-stream/1`` for
AIS) is a header line (``"kind": "header"``: model, data, settings, scoring, and the
shard if any), one line per point with exactly the keys of an entry of ``points`` in
the command's ``--json`` document, written and flushed batch by batch, and a final
summary line (``"kind": "summary"``) that records the sha256 of every byte before it
(``lines_digest``: ``head -n -1 FILE | sha256sum``), so the header and the point lines
of a finished file are bound to each other. Every point's numbers depend only on the seed
and its index, so a run resumed from its file, or shards merged, give the numbers of
one uninterrupted run, bit for bit. ``ResultsFormat`` says, for each kind of run, how
its lines are made and read back.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from vaeeval.errors import DataError, SpecError, VaeevalError, listing, option
from vaeeval.estimators.annealing.results_file import AIS_RESULTS
from vaeeval.io.files import MAX_JSON_DEPTH, atomic_write, json_depth, load_json, reading, regular_file, writing
from vaeeval.results.formats import FORMATS, ResultsFormat, points_digest, results_format, schema_names, seal
from vaeeval.results.schemas import ELBO_SCHEMA, STREAM_SCHEMA
from vaeeval.runs.formats import StoredRun, describe_difference

DOCUMENT_ONLY = ("recon_terms",)  # summary keys of a --json document that a results file's summary line does not hold
MAX_LINE_BYTES = 1 << 24  # the longest line read (16 MiB): a header is a few kB, a point line a few hundred bytes
LINES_DIGEST = "lines_digest"  # the summary's key for the sha256 of every byte before it


class ResultsWriter:
    """Appends JSON lines to a results file, flushing after every batch, and seals it with its summary.

    ``digest`` is the sha256 of the bytes the file already holds (a resumed run's, from ``read_stream``);
    every line written is added to it, so the summary can record the digest of everything before it.
    """

    def __init__(self, handle: TextIO, path: Path, digest: Any = None) -> None:
        self.handle, self.path = handle, path
        self.digest = digest.copy() if digest is not None else hashlib.sha256()

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        """The lines, written and flushed.

        Raises:
            VaeevalError: the file cannot take them (a full disk); what was written before stays valid.
        """
        try:
            for record in records:
                line = json.dumps(record, allow_nan=False) + "\n"  # ASCII: json.dumps escapes the rest
                self.handle.write(line)
                self.digest.update(line.encode("ascii"))
            self.handle.flush()
        except OSError as error:
            raise VaeevalError(
                f"{self.path}: cannot write the results file ({error.strerror or error}); the points written so far stay, "
                f"and {option('resume')} continues from them"
            ) from None

    def finish(self, summary: dict[str, Any]) -> None:
        """The summary line, recording the digest of every line before it (the header and every point line)."""
        self.write([{**summary, LINES_DIGEST: "sha256:" + self.digest.hexdigest()}])


def read_stream(path: str | Path, *, repair: bool = False) -> StoredRun:
    """Read a results file, every line checked; with ``repair``, cut off a last line a crash left half written.

    Lines are read one at a time, none longer than ``MAX_LINE_BYTES``; every point line must lie in the
    file's shard and hold every column its format requires. A finished file's summary is its last line,
    records the sha256 of every byte before it, and holds the numbers its point lines give: a file edited
    after it was finished (its header, a point line, their order, the summary) is refused, never read
    short. The file is cut only once every line was read and checked.

    Raises:
        DataError: missing, not a regular file, not a results file, or a line that breaks its schema.
        VaeevalError: ``repair`` and the file cannot be written (read-only).
    """
    path = Path(path)
    regular_file(path, DataError, "results file")
    digest, kept = hashlib.sha256(), 0  # of the lines read so far, and their bytes
    header, results, points, seen = None, None, [], set()
    summary, summary_at, before, cut = None, 0, "", False
    with reading(path, DataError, "results file"), path.open("rb") as handle:
        for number, raw in _raw_lines(path, handle):
            if repair and not raw.endswith(b"\n"):
                cut = True  # a line a crash left half written: the last, as readline ends one only there
                break
            record = _line(path, number, raw.decode("utf-8", errors="replace"))
            if header is None:
                header, results = record, _opening(path, record)
            elif summary is not None:
                raise DataError(path, f"line {summary_at} is a summary line, but line {number} follows it: a results file's "
                                      "summary is its last line (two files joined?)")
            elif isinstance(record, dict) and record.get("kind") == "summary":
                summary, summary_at, before = record, number, "sha256:" + digest.hexdigest()
            else:
                points.append(check_point(path, f"line {number}", record, results, header["data"]["n"], seen, header["shard"]))
            digest.update(raw)
            kept += len(raw)
    if header is None:
        raise DataError(path, f"not a vaeeval results file (its first line is no {STREAM_SCHEMA} header)")
    if summary is not None:
        summary = _checked_summary(path, summary, points, before)
        _check_numbers(path, summary_at, header, results, summary, points)
    if cut:  # only a results file is ever cut, only its half-written last line, and only once the rest is read
        with writing(path, "results file"):
            os.truncate(path, kept)
    return StoredRun(path, header, points, summary, digest)


def _raw_lines(path: Path, handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(line number, its bytes with the newline) for each line, none read past ``MAX_LINE_BYTES``."""
    limit = MAX_LINE_BYTES
    for number in itertools.count(1):
        raw = handle.readline(limit + 1)
        if not raw:
            return
        if len(raw) - raw.endswith(b"\n") > limit:
            raise DataError(path, f"line {number} is longer than {limit} bytes, more than any results file's line; "
                                  "not a vaeeval results file")
        yield number, raw


def _opening(path: Path, header: Any) -> ResultsFormat:
    """The format of the file whose first line is ``header``, checked."""
    if not isinstance(header, dict) or header.get("kind") != "header" or header.get("schema") not in schema_names():
        raise DataError(path, f"not a vaeeval results file (its first line is no {STREAM_SCHEMA} header)")
    return check_header(path, header)


def _line(path: Path, number: int, line: str) -> Any:
    try:
        return load_json(line, f"line {number}")
    except json.JSONDecodeError:
        raise DataError(path, f"line {number} is not JSON; not a vaeeval results file") from None
    except ValueError as error:
        raise DataError(path, str(error)) from None


def check_header(path: Path, header: Any) -> ResultsFormat:
    """The format of a results file whose first line is ``header``, checked: keys, types, and its digest.

    Raises:
        DataError: naming what is wrong with line 1.
    """
    results = FORMATS[header["schema"]]
    try:
        results.settings(**header["settings"])
        results.check_header(header)
        model, data, shard = header["model"], header["data"], header["shard"]
        dims, n = model["dims"], data["n"]
        json.dumps(model["likelihood"], sort_keys=True)
        if not (isinstance(dims, int) and dims >= 1 and isinstance(n, int) and n >= 0 and isinstance(data.get("digest"), str | None)):
            raise ValueError("model.dims or data.n is not a count")
        if shard is not None and not _a_shard(shard, n):
            raise ValueError(f"shard {shard} is not one of count equal contiguous slices of the {n} points")
    except (KeyError, TypeError, ValueError, AttributeError, SpecError) as error:
        raise DataError(path, f"line 1: not a complete {results.schema} header ({type(error).__name__}: {error})") from None
    if "digest" in header and seal(header)["digest"] != header["digest"]:
        raise DataError(path, "line 1: the header was edited after it was written (its digest does not match)")
    return results


def _a_shard(shard: Any, n: int) -> bool:
    """``shard`` is the record of ``Shard.of(index, count, n)``."""
    if not isinstance(shard, dict) or not all(type(shard.get(key)) is int for key in ("index", "count", "start", "stop")):
        return False
    index, count = shard["index"], shard["count"]
    return 0 <= index < count and (shard["start"], shard["stop"]) == (index * n // count, (index + 1) * n // count)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_point(path: Path, where: str, record: Any, results: ResultsFormat, n: int, seen: set[int],
                shard: dict[str, int] | None = None) -> dict[str, Any]:
    """A point line (or entry), checked: an object, an index within the data (and the file's shard) not seen
    before, every column the format requires, finite numbers.

    Raises:
        DataError: naming ``where`` (``line 7``, ``points[5]``) and what is wrong.
    """
    if not isinstance(record, dict):
        raise DataError(path, f"{where} is {type(record).__name__}, not a point object")
    index = record.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        raise DataError(path, f"{where}: point index {index!r} is not one of the data's {n} points")
    if shard is not None and not shard["start"] <= index < shard["stop"]:
        raise DataError(path, f"{where}: point {index} is outside the file's shard {shard['index']}/{shard['count']} "
                              f"(points {shard['start']} to {shard['stop'] - 1})")
    if index in seen:
        raise DataError(path, f"{where}: point {index} is in the file twice")
    seen.add(index)
    for key in results.columns.names(optional=False):
        if key not in record:
            raise DataError(path, f"{where}: point {index} has no {key}, which every {results.schema} point holds")
    for key in results.columns.numbers:
        if not _finite_number(record.get(key)):
            raise DataError(path, f"{where}: point {index}'s {key} is {record.get(key)!r}, not a finite number")
    for key in results.columns.maybe_numbers:
        if record.get(key) is not None and not _finite_number(record[key]):
            raise DataError(path, f"{where}: point {index}'s {key} is {record[key]!r}, not a finite number or null")
    for key in results.columns.flags:
        if not isinstance(record.get(key), bool) and not (key not in record and key in results.columns.optional):
            raise DataError(path, f"{where}: point {index}'s {key} is {record.get(key)!r}, not true or false")
    for key in results.columns.counts:  # optional: only where the run has them (a sequence's tokens)
        value = record.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise DataError(path, f"{where}: point {index}'s {key} is {value!r}, not a whole number")
    return record


def _checked_summary(path: Path, summary: dict[str, Any], points: list[dict[str, Any]], before: str) -> dict[str, Any]:
    """The summary line (without its ``lines_digest``), if the lines before it are still those it was written after.

    ``before``: the sha256 of every byte before the summary line.
    """
    if LINES_DIGEST not in summary:
        raise DataError(
            path,
            "was finished by an older vaeeval, whose summary line does not bind the header to the point lines; run it "
            f"again (or, to vouch for it as it stands, delete its last line and {option('resume')} it: that seals it)",
        )
    if summary[LINES_DIGEST] != before or summary.get("count") != len(points) or summary.get("digest") != points_digest(points):
        raise DataError(
            path,
            f"was edited after the run finished: its summary counts {summary.get('count')!r} point lines and a digest that the "
            f"{len(points)} lines now in it do not match; restore it, or run again without {option('resume')}",
        )
    return {key: value for key, value in summary.items() if key != LINES_DIGEST}


def _check_numbers(path: Path, number: int, header: dict[str, Any], results: ResultsFormat, summary: dict[str, Any],
                   points: list[dict[str, Any]]) -> None:
    """The summary line's numbers are those its point lines give (what a reader of the file alone would cite).

    Keys the points cannot give (none, as vaeeval writes files) are left as they are.
    """
    try:
        line = results.summary_line(results.evaluation(header, points), points) if points else results.empty_summary_line()
        expected = json.loads(json.dumps(line["summary"], allow_nan=False))
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(path, f"its point lines add up to no summary ({type(error).__name__}: {error})") from None
    found = summary.get("summary")
    if isinstance(expected, dict) and isinstance(found, dict):
        same = all(key in found and found[key] == value for key, value in expected.items())
    else:
        same = found == expected
    if not same:
        raise DataError(path, f"line {number}: the summary's numbers are not those its {len(points)} point lines give (edited "
                              f"after the run finished?); restore it, or run again without {option('resume')}")


def read_results(path: str | Path) -> StoredRun:
    """A results file, or an ``elbo --json`` or ``ais --json`` document read as one.

    Raises:
        DataError: neither, or a document without its summary or points.
    """
    path = Path(path)
    regular_file(path, DataError, "results file")
    with reading(path, DataError, "results file"), path.open("rb") as handle:
        first = handle.readline(MAX_LINE_BYTES + 1)
    if _opens_a_results_file(first):
        return read_stream(path)
    try:
        with reading(path, DataError, "results file"):
            text = path.read_text()
    except UnicodeDecodeError:
        return read_stream(path)
    try:
        document = load_json(text, "the document")
    except json.JSONDecodeError:
        return read_stream(path)
    except ValueError as error:
        raise DataError(path, str(error)) from None
    documents = {results.document: results for results in FORMATS.values()}
    schema = document.get("schema") if isinstance(document, dict) else None
    if not isinstance(schema, str) or schema not in documents:
        if schema in schema_names():
            return read_stream(path)  # a results file holding only its header
        raise DataError(path, f"neither a {ELBO_SCHEMA} document nor a vaeeval results file")
    results = documents[document["schema"]]
    try:
        summary = {key: value for key, value in document["summary"].items() if key not in DOCUMENT_ONLY}
        header = {
            "kind": "header",
            "schema": results.schema,
            "model": document["model"],
            "data": document["data"],
            "settings": document["settings"],
            "scoring": summary["scoring"],
            **({"cost": summary["cost"]} if results is AIS_RESULTS else {"kl_kind": summary["kl_kind"]}),
            "domain": document["data"]["domain"],
            "shard": None,
        }
        raw_points = document["points"]
        if not isinstance(raw_points, list):
            raise TypeError("points is not a list")
    except (KeyError, TypeError) as error:
        raise DataError(path, f"not a complete {document['schema']} document (no {error})") from None
    header = seal(header)
    check_header(path, header)
    seen: set[int] = set()
    points = [check_point(path, f"points[{number}]", record, results, header["data"]["n"], seen)
              for number, record in enumerate(raw_points)]
    return StoredRun(path, header, points, {"kind": "summary", "summary": summary, "count": len(points),
                                            "digest": points_digest(points)})


def _opens_a_results_file(line: bytes) -> bool:
    """The first line is a results file's header (a ``--json`` document, indented, opens with ``{`` alone),
    or too long for any line vaeeval writes (``read_stream`` then refuses it, naming line 1)."""
    if len(line) > MAX_LINE_BYTES:
        return True
    if json_depth(line) > MAX_JSON_DEPTH:
        return False
    try:
        first = json.loads(line, parse_constant=lambda constant: None)
    except ValueError:
        return False
    return isinstance(first, dict) and first.get("kind") == "header"


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
    if len(records) < n:
        missing = _first_missing(sorted(records), n)
        raise VaeevalError(
            f"the files hold {len(records)} of {n} points; missing {listing(missing)} (a shard not finished or not given)"
        )
    return [records[index] for index in range(n)]


def _first_missing(present: list[int], n: int, most: int = 6) -> list[int]:
    """The first few of 0..n-1 not in ``present`` (sorted), without listing all n."""
    missing, expected = [], 0
    for index in [*present, n]:
        while expected < index and len(missing) < most:
            missing.append(expected)
            expected += 1
        expected = index + 1
        if len(missing) >= most:
            break
    return missing


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
    header = seal({**runs[0].header, "shard": None})
    return MergedRun(header, records, results_format(header).evaluation(header, records))


def write_results(path: str | Path, header: dict[str, Any], records: Sequence[dict[str, Any]], evaluation: Any) -> None:
    """Write a finished results file in one go: the header, every point, the summary."""
    with writing(Path(path), "results file"), atomic_write(path) as handle:
        writer = ResultsWriter(handle, Path(path))
        writer.write([header, *records])
        writer.finish(results_format(header).summary_line(evaluation, records))
