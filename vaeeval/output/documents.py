"""The ``--json`` documents, assembled from records: one function per schema."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaeeval.estimators.annealing.certify import elbo_note
from vaeeval.results.formats import ResultsFormat
from vaeeval.results.numbers import AISEvaluation, BDMCEvaluation, Evaluation
from vaeeval.results.recon_terms import LossStatistics, recon_terms
from vaeeval.results.records import (
    ais_point_records,
    ais_settings_record,
    ais_summary_record,
    bdmc_point_records,
    bdmc_summary_record,
    convergence_records,
    data_record,
    evaluation_points,
    finite,
    latents_record,
    model_record,
    settings_record,
    stat_record,
    summary_record,
)
from vaeeval.results.schemas import (
    AIS_SCHEMA,
    BDMC_SCHEMA,
    CALIBRATE_SCHEMA,
    CHECK_SCHEMA,
    COMPARE_SCHEMA,
    ELBO_SCHEMA,
    INSPECT_SCHEMA,
    LATENTS_SCHEMA,
)

if TYPE_CHECKING:
    from vaeeval.analysis.calibrate import Calibration
    from vaeeval.analysis.compare import Comparison
    from vaeeval.analysis.gates import BaselineCheck
    from vaeeval.estimators.annealing.bdmc import Simulated
    from vaeeval.format.data import Dataset
    from vaeeval.format.model import Model
    from vaeeval.results.latents import LatentHealth

UNITS = "nats per data point; higher is better (kl: lower)"


def elbo_document(
    evaluation: Evaluation,
    model: dict[str, Any],
    data: dict[str, Any],
    *,
    convergence: bool = False,
    latents: LatentHealth | None = None,
    statistics: LossStatistics | None = None,
) -> dict[str, Any]:
    """The ``vaeeval elbo --json`` document (schema ``vaeeval.elbo/1``).

    Args:
        evaluation: the results.
        model, data: ``model_record`` and ``data_record`` of what was evaluated.
        convergence: add the IWAE-versus-K list.
        latents: add the latent-health object.
        statistics: ``--explain``'s second pass, for ``summary.recon_terms``.
    """
    document = {
        "schema": ELBO_SCHEMA,
        "units": UNITS,
        "model": model,
        "data": data,
        "settings": settings_record(evaluation.settings),
        "summary": {
            **summary_record(evaluation),
            "recon_terms": recon_terms(evaluation.points.recon, model, evaluation.scoring, statistics),
        },
        "points": evaluation_points(evaluation),
    }
    if convergence:
        document["convergence"] = convergence_records(evaluation)
    if latents is not None:
        document["latents"] = latents_record(latents)
    note = elbo_note(evaluation, model, data, convergence=convergence)
    if note is not None:
        document["notes"] = [note]
    return document


def latents_document(health: LatentHealth, model: Model, dataset: Dataset, evaluation: Evaluation) -> dict[str, Any]:
    """The ``vaeeval latents --json`` document (schema ``vaeeval.latents/1``)."""
    return {
        "schema": LATENTS_SCHEMA,
        "model": model_record(model),
        "data": data_record(dataset),
        "settings": settings_record(evaluation.settings),
        "latents": latents_record(health),
    }


def inspect_document(model: Model) -> dict[str, Any]:
    """The ``vaeeval inspect --json`` document (schema ``vaeeval.inspect/1``)."""
    return {
        "schema": INSPECT_SCHEMA,
        "model": model_record(model),
        "layers": [
            {
                "part": layer.part,
                "index": layer.index,
                "type": layer.type,
                "detail": layer.detail,
                "output_shape": list(layer.out_shape),
                "parameters": layer.parameters,
            }
            for layer in model.layers
        ],
    }


def model_label(model: Model, index: int) -> str:
    """How documents name a model: its path, or its position."""
    return str(model.path) if model.path else f"model {index}"


def compare_document(comparison: Comparison, dataset: Dataset) -> dict[str, Any]:
    """The ``vaeeval compare --json`` document (schema ``vaeeval.compare/1``).

    With ``--estimator ais`` the settings, each model's summary and points are those of
    ``vaeeval.ais/1``, and ``estimator`` says so.
    """
    models, evaluations = comparison.models, comparison.evaluations
    paths = [model_label(model, i) for i, model in enumerate(models)]
    ais = comparison.metric == "ais"
    settings, summary, points = (
        (ais_settings_record, ais_summary_record, lambda e: ais_point_records(e.points))
        if ais else (settings_record, summary_record, evaluation_points)
    )
    return {
        "schema": COMPARE_SCHEMA,
        "units": UNITS,
        "estimator": comparison.metric,
        "data": data_record(dataset),
        "settings": settings(evaluations[0].settings),
        "models": [
            {
                "model": model_record(model),
                "rank": comparison.rank(index),
                "summary": summary(evaluation),
                "points": points(evaluation),
            }
            for index, (model, evaluation) in enumerate(zip(models, evaluations, strict=True))
        ],
        "rankings": [
            {
                "measure": group.measure,
                "ranked": group.ranked,
                "order": [paths[i] for i in group.members],
                "reason": group.refusal,
            }
            for group in comparison.groups
        ],
        "differences": [
            {
                "model": paths[difference.model],
                "versus": paths[difference.best],
                "metric": comparison.metric,
                "mean": difference.paired.mean,
                "stderr": difference.paired.stderr,
                "unpaired_stderr": difference.unpaired_stderr,
            }
            for difference in comparison.differences
        ],
        "notes": list(comparison.notes),
    }


def check_document(result: BaselineCheck) -> dict[str, Any]:
    """The ``vaeeval check --json`` document (schema ``vaeeval.check/1``)."""
    return {
        "schema": CHECK_SCHEMA,
        "metric": result.metric,
        "new": result.new,
        "baseline": result.baseline,
        "difference": stat_record(result.difference),
        "points": result.points,
        "tolerance": result.tolerance,
        "confidence": result.confidence,
        "passed": result.passed,
        "reason": result.reason,
    }


def ais_document(evaluation: AISEvaluation, model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The ``vaeeval ais --json`` document (schema ``vaeeval.ais/1``)."""
    return {
        "schema": AIS_SCHEMA,
        "units": UNITS,
        "model": model,
        "data": data,
        "settings": ais_settings_record(evaluation.settings),
        "summary": ais_summary_record(evaluation),
        "points": ais_point_records(evaluation.points),
    }


def simulated_record(simulated: Simulated, evaluation: BDMCEvaluation, saved: str | None) -> dict[str, Any]:
    """What a BDMC document says about its simulated points."""
    return {
        "n": int(len(simulated.x)),
        "domain": evaluation.domain.to_spec(),
        "levels": None if simulated.bins is None else simulated.bins.levels,
        "range": None if simulated.bins is None else simulated.bins.range,
        "seed": evaluation.settings.seed,
        "saved": saved,
    }


def bdmc_document(evaluation: BDMCEvaluation, model: Model, simulated: Simulated, saved: str | None = None) -> dict[str, Any]:
    """The ``vaeeval bdmc --json`` document (schema ``vaeeval.bdmc/1``)."""
    return {
        "schema": BDMC_SCHEMA,
        "units": UNITS,
        "model": model_record(model),
        "data": simulated_record(simulated, evaluation, saved),
        "settings": ais_settings_record(evaluation.settings),
        "summary": bdmc_summary_record(evaluation),
        "points": bdmc_point_records(evaluation.points),
    }


def run_document(results: ResultsFormat, evaluation: Any, header: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``--json`` document of a run of any registered estimator, made from its results format alone
    (``vaeeval merge`` of an estimator without a document of its own); its schema is ``results.document``."""
    return {
        "schema": results.document,
        "units": UNITS,
        "model": header["model"],
        "data": header["data"],
        "settings": header["settings"],
        "summary": results.summary(evaluation),
        "points": sorted(records, key=lambda record: record["index"]),
    }


CALIBRATION_NOTE = ("before and after are on the data the scale was fitted on, so 'after' is optimistic: "
                    "report log-likelihoods of the new model on other held-out data")


def calibrate_document(calibration: Calibration, model: Model, data: Dataset, output: str) -> dict[str, Any]:
    """The ``vaeeval calibrate --json`` document (schema ``vaeeval.calibrate/1``)."""
    fitted = calibration.scale.tolist() if calibration.per_dimension else calibration.scale
    return {
        "schema": CALIBRATE_SCHEMA,
        "units": UNITS,
        "model": model_record(model),
        "data": data_record(data),
        "family": calibration.family,
        "parameter": "sigma" if calibration.family == "gaussian" else "scale",
        "per_dimension": calibration.per_dimension,
        "fitted": fitted,
        "output": output,
        "arch_options": None if calibration.arch_options is None else list(calibration.arch_options),
        "samples": calibration.record["samples"],
        "seed": calibration.record["seed"],
        "before": {name: finite(value) for name, value in calibration.before.items()},
        "after": {name: finite(value) for name, value in calibration.after.items()},
        "note": CALIBRATION_NOTE,
    }

