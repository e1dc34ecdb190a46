"""What a results file holds for one estimator (``ResultsFormat``), and the digests that seal its lines.

An estimator declares one ``ResultsFormat``: how its header, point lines and summary
are made from a run and read back, its settings and its point columns. ``register``
(one line, in ``runs.formats`` for the estimators vaeeval ships) makes ``runs``
stream, resume, shard and merge its runs, ``vaeeval merge`` show them and
``vaeeval schema`` describe them, without knowing what it computes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vaeeval.results.columns import PointColumns


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
        settings: the settings dataclass a header's ``settings`` builds.
        columns: the estimator's point columns (``results.columns``).
        evaluator: the class of the estimator (its ``n``, ``parts(indices, progress)``, ``finish(parts)``).
        check_header: raises ``KeyError``, ``TypeError`` or ``ValueError`` when a header lacks what this
            estimator's headers hold beyond the model, data, settings and shard every header has.
    """

    schema: str
    document: str
    make_header: Callable[[Any, Any], dict[str, Any]]  # (evaluator, shard or None)
    points: Callable[[Any, Any], list[dict[str, Any]]]
    summary: Callable[[Any], dict[str, Any]]
    evaluation: Callable[[dict[str, Any], Sequence[dict[str, Any]]], Any]
    settings: type  # the settings dataclass a header's settings must build
    columns: PointColumns  # the point lines' keys: what reading a file checks of each
    evaluator: type  # the class whose runs these files hold
    check_header: Callable[[dict[str, Any]], None] = lambda header: None  # raises on what else a header must hold

    def header(self, evaluator: Any, shard: Any) -> dict[str, Any]:
        """The first line of a results file, sealed with the digest of its content."""
        return seal(self.make_header(evaluator, shard))

    def summary_line(self, evaluation: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The last line of a finished results file: the summary, and the count and digest of the point lines."""
        return {"kind": "summary", "summary": self.summary(evaluation), "count": len(records), "digest": points_digest(records)}

    def empty_summary_line(self) -> dict[str, Any]:
        """The last line of a part with no points (a shard beyond the last point)."""
        return {"kind": "summary", "summary": None, "count": 0, "digest": points_digest([])}


def _digest(value: Any) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=False).encode()).hexdigest()


def seal(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` with ``digest``: of everything else in it, so an edit is seen when it is read back."""
    content = {key: value for key, value in header.items() if key != "digest"}
    return {**content, "digest": _digest(content)}


def points_digest(records: Sequence[dict[str, Any]]) -> str:
    """The digest of a run's point lines, whatever their order in the file."""
    return _digest(sorted(records, key=lambda record: record["index"]))


# Every estimator's results files, by the schema their headers name.
FORMATS: dict[str, ResultsFormat] = {}


def register(results: ResultsFormat) -> ResultsFormat:
    """Make ``results`` the format of files whose header names ``results.schema``, and of ``results.evaluator``'s runs."""
    FORMATS[results.schema] = results
    return results


def schema_names() -> list[str]:
    """The headers' schemas of every registered kind of results file (a list: a header's ``schema`` may be any
    JSON value, hashable or not, and is looked up in it)."""
    return list(FORMATS)


def results_format(header: dict[str, Any]) -> ResultsFormat:
    """The format of the results file this header opens."""
    return FORMATS[header["schema"]]


def format_of(estimator: Any) -> ResultsFormat:
    """How the runs of this estimator are written to and read from results files."""
    for results in FORMATS.values():
        if type(estimator) is results.evaluator:
            return results
    raise TypeError(f"no results format is registered for {type(estimator).__name__}")
