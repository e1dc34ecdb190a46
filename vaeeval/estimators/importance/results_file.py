"""The importance sampler's results files (``vaeeval elbo --output``): schema ``vaeeval.elbo-stream/1``."""

from __future__ import annotations

from typing import Any

from vaeeval.estimators.importance.evaluate import Evaluator
from vaeeval.format.domains import domain_from_spec
from vaeeval.format.terms import KL_KINDS
from vaeeval.results.formats import ResultsFormat
from vaeeval.results.numbers import Scoring, Settings
from vaeeval.results.records import (
    POINT_COLUMNS,
    data_record,
    evaluation_from_records,
    model_record,
    point_records,
    scoring_record,
    settings_record,
    summary_record,
)
from vaeeval.results.schemas import ELBO_SCHEMA, STREAM_SCHEMA


def _check_header(header: dict[str, Any]) -> None:
    Scoring(**header["scoring"])
    domain_from_spec(header["domain"])
    if header["kl_kind"] not in KL_KINDS:
        raise ValueError(f"kl_kind {header['kl_kind']!r}")


def header_record(
    settings: Settings,
    scoring: Scoring,
    kl_kind: str,
    domain: dict[str, Any],
    model: dict[str, Any],
    data: dict[str, Any],
    shard: Any = None,
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


def _elbo_header(evaluator: Any, shard: Any = None) -> dict[str, Any]:
    return header_record(
        evaluator.settings,
        evaluator.scoring,
        evaluator.model.prior.kl_kind,
        evaluator.domain.to_spec(),
        model_record(evaluator.model),
        data_record(evaluator.dataset),
        shard,
    )


ELBO_RESULTS = ResultsFormat(
    STREAM_SCHEMA,
    ELBO_SCHEMA,
    _elbo_header,
    lambda evaluator, points: point_records(points, evaluator.settings.samples, evaluator.model.prior.monte_carlo_kl),
    summary_record,
    evaluation_from_records,
    Settings,
    POINT_COLUMNS,
    Evaluator,
    _check_header,
)
