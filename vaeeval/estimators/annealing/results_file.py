"""AIS's results files (``vaeeval ais --output``): schema ``vaeeval.ais-stream/1``."""

from __future__ import annotations

from typing import Any

from vaeeval.estimators.annealing.ais import AISEvaluator
from vaeeval.format.domains import domain_from_spec
from vaeeval.results.formats import ResultsFormat
from vaeeval.results.numbers import AISCost, AISSettings, Scoring
from vaeeval.results.records import (
    AIS_COLUMNS,
    ais_evaluation_from_records,
    ais_point_records,
    ais_settings_record,
    ais_summary_record,
    cost_record,
    data_record,
    model_record,
    scoring_record,
)
from vaeeval.results.schemas import AIS_SCHEMA, AIS_STREAM_SCHEMA


def _check_header(header: dict[str, Any]) -> None:
    Scoring(**header["scoring"])
    domain_from_spec(header["domain"])
    AISCost(header["cost"]["pilot_gradients"], header["cost"]["gradients"])


def ais_header_record(evaluator: Any, shard: Any = None) -> dict[str, Any]:
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


AIS_RESULTS = ResultsFormat(
    AIS_STREAM_SCHEMA,
    AIS_SCHEMA,
    ais_header_record,
    lambda evaluator, points: ais_point_records(points),
    ais_summary_record,
    ais_evaluation_from_records,
    AISSettings,
    AIS_COLUMNS,
    AISEvaluator,
    _check_header,
)
