"""One JSON-ready record shape per result, and the way back from records to results.

JSON keys named in the issue tracker and the README (``schema``, ``model``,
``data``, ``settings``, ``summary``, ``points`` and the metric names) are a
contract: add keys, never rename them. ``schemas`` builds the JSON Schemas from
the key lists here, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

import numpy as np

from vaeeval.format.domains import domain_from_spec
from vaeeval.results.columns import COUNT, FLAG, MAYBE_NUMBER, NUMBER, Column, PointColumns, finite
from vaeeval.results.numbers import (
    GAP_LIMIT,
    METRICS,
    AISCost,
    AISEvaluation,
    AISPointResults,
    AISSettings,
    BDMCEvaluation,
    BDMCPointResults,
    Columns,
    Evaluation,
    PointResults,
    Scoring,
    Settings,
    Stat,
    evaluation_of,
    summarize_ais,
)
from vaeeval.results.sequences import SequenceSummary
from vaeeval.results.sequences import note as sequence_note

if TYPE_CHECKING:
    from vaeeval.format.data import Dataset
    from vaeeval.format.model import Model
    from vaeeval.results.latents import LatentHealth
    from vaeeval.results.sequences import SequenceSummary

DEQUANTIZATION = (
    "the uniform-dequantization figure for a density on discrete data, not a probability "
    "(log P(bin) >= E_u[log p(x + u)] + D log Δ bounds the bin probability only for the density "
    "averaged over the bin; this uses it at the bin's centre)"
)
SETTINGS_KEYS = tuple(f.name for f in fields(Settings))
SCORING_KEYS = tuple(f.name for f in fields(Scoring))
# The importance sampler's point columns (``elbo``): the keys of a point object, in this order.
POINT_COLUMNS = PointColumns((
    Column("elbo", NUMBER, "the evidence lower bound, recon - kl"),
    Column("recon", NUMBER, "E_q[log p(x|z)], the reconstruction term"),
    Column("kl", NUMBER, "KL(q(z|x) || p(z))"),
    Column("iwae", NUMBER, "the importance-weighted estimate of log p(x) from K samples"),
    Column("elbo_stderr", MAYBE_NUMBER, "the Monte Carlo standard error of elbo"),
    Column("iwae_stderr", NUMBER, "the delta-method standard error of iwae"),
    Column("ess", NUMBER, "the effective sample size of the K importance weights"),
    Column("khat", MAYBE_NUMBER, "the PSIS Pareto k-hat of the weights (null when too few samples)"),
    Column("kl_stderr", MAYBE_NUMBER, "the standard error of a Monte Carlo KL", optional=True),
    Column("ess_fraction", NUMBER, "ess / K"),
    Column("unreliable", FLAG, "k-hat above the threshold: iwae may be far from log p(x)"),
    Column("tokens", COUNT, "the positions of a padded sequence that count (--lengths)", optional=True),
))
POINT_NUMBERS = tuple(
    name for name in POINT_COLUMNS.names() if name not in ("kl_stderr", "ess_fraction", "unreliable", "tokens")
)


def to_json(document: dict[str, Any]) -> str:
    """Serialize a document; NaN and infinity are refused, never written."""
    return json.dumps(document, indent=2, allow_nan=False)


def stat_record(stat: Stat) -> dict[str, float | None]:
    return {"mean": finite(stat.mean), "stderr": finite(stat.stderr)}


def settings_record(settings: Settings) -> dict[str, Any]:
    """The ``settings`` object: how the evaluation was run."""
    return {key: getattr(settings, key) for key in SETTINGS_KEYS}


def scoring_record(scoring: Scoring) -> dict[str, Any]:
    """What a document says about how the numbers were made."""
    return {key: getattr(scoring, key) for key in SCORING_KEYS}


def diagnostics_record(evaluation: Evaluation) -> dict[str, Any]:
    """The ``summary.diagnostics`` object: how far to trust the numbers."""
    diagnostics = evaluation.summary.diagnostics
    return {
        "unreliable": {
            "count": len(diagnostics.unreliable),
            "share": diagnostics.share,
            "khat_threshold": finite(diagnostics.threshold),
            "points": list(diagnostics.unreliable),  # worst (largest k-hat) first
        },
        "iwae_minus_elbo": stat_record(diagnostics.gap),
        "ess": stat_record(diagnostics.ess),
        "ess_fraction": stat_record(diagnostics.ess_fraction),
        "khat": stat_record(diagnostics.khat),
        "elbo_stderr": stat_record(diagnostics.elbo_stderr),
        "iwae_stderr": stat_record(diagnostics.iwae_stderr),
    }


def convergence_records(evaluation: Evaluation) -> list[dict[str, Any]]:
    """The ``convergence`` list: IWAE over the first k samples of every point."""
    return [{"samples": k, "iwae": stat_record(stat)} for k, stat in evaluation.convergence.summary()]


def latents_record(health: LatentHealth) -> dict[str, Any]:
    """The ``latents`` object: latent health (with ``groups`` for a hierarchical latent)."""
    record = {
        "kl_per_dim": None if health.kl_per_dim is None else health.kl_per_dim.tolist(),
        "activity": health.activity.tolist(),
        "active_threshold": health.threshold,
        "active_units": int(health.active.sum()),
        "inactive": np.flatnonzero(~health.active).tolist(),
        "mutual_information": health.mutual_information,
        "mutual_information_max": health.max_information,
        "mean_kl": health.mean_kl,
        "aggregate_kl": health.aggregate_kl,
        "warning": health.warning,
    }
    if health.groups is not None:  # a hierarchical latent's
        record["groups"] = [
            {"name": g.name, "units": list(g.units), "active_units": g.active_units, "kl": g.kl, "kl_stderr": g.kl_stderr,
             "kl_kind": g.kl_kind}
            for g in health.groups
        ]
    return record


def model_record(model: Model) -> dict[str, Any]:
    """What a document says about the model."""
    return {
        "path": str(model.path) if model.path else None,
        "format": None if model.arch else 1,
        "arch": model.arch,  # the --arch the state dict was read through
        "description": model.description,
        "family": model.likelihood.family,
        "likelihood": model.likelihood.spec,
        "measure": model.likelihood.measure,  # the family's own; summary.measure is what was reported
        "prior": model.prior.spec,
        "kl": model.prior.kl_kind,
        "latent_dim": model.latent_dim,
        "input_shape": list(model.input_shape),
        "dims": model.data_dims,
        "domain": model.domain.to_spec() if model.domain else None,
        "parameters": model.parameter_count,
        "digest": model.digest,  # of the model (or weights) file
        "notes": list(model.notes),  # how the model was read: an assumed prior, a warning
        "covariates": list(model.covariates),  # the data's arrays the model is conditioned on
        "library": None if model.library is None else model.library.kind,  # a count model's library size: observed or latent
        "data_layer": model.data_layer,  # the AnnData layer holding its counts, as the file records it
        "scale": scale_record(model),  # a Gaussian's or Laplace's fixed scale, for recon_terms
    }


def scale_record(model: Model) -> dict[str, Any] | None:
    """A fixed Gaussian sigma or Laplace scale as the evaluation uses it (float32): ``shared`` (one value, or
    null per dimension) and ``log_sum``, sum_d log scale_d over the D dimensions; null for any other likelihood."""
    scale = getattr(model.likelihood, "scale", None)
    if model.likelihood.family not in ("gaussian", "laplace") or scale is None:
        return None
    found = scale.detach().cpu().numpy() if hasattr(scale, "detach") else np.float32(scale)  # float32, as evaluated
    values = np.asarray(found, dtype=np.float32).astype(np.float64)
    values = np.broadcast_to(values, model.likelihood.input_shape)
    shared = float(values.flat[0]) if values.ndim == 0 or np.all(values == values.flat[0]) else None
    return {"shared": shared, "log_sum": math.fsum(np.log(values).ravel().tolist())}


def data_record(dataset: Dataset) -> dict[str, Any]:
    """What a document says about the data."""
    return {
        "path": str(dataset.path) if dataset.path else None,
        "key": dataset.key,
        "n": dataset.n,
        "total": dataset.total,
        "shape": list(dataset.array.shape),
        "dims": dataset.dims,
        "domain": dataset.domain.to_spec(),  # as detected from the values
        "digest": dataset.digest,  # of the evaluated points (and covariates): runs on the same data share it
        "covariates": sorted(dataset.covariates),
        "layer": dataset.layer,  # the AnnData layer read from an .h5ad
    }


def evaluation_points(evaluation: Evaluation) -> list[dict[str, Any]]:
    """The ``points`` list of a document."""
    return point_records(evaluation.points, evaluation.settings.samples, evaluation.monte_carlo_kl)


def summary_record(evaluation: Evaluation) -> dict[str, Any]:
    """The ``summary`` object of a document."""
    summary = evaluation.summary
    record = {
        "n": summary.n,
        "measure": evaluation.measure,
        "scoring": scoring_record(evaluation.scoring),
        "kl_kind": evaluation.kl_kind,
        **{name: stat_record(getattr(summary, name)) for name in METRICS},
        "bits_per_dim": stat_record(summary.bits_per_dim),
    }
    if summary.dequantized_bits_per_dim is not None:
        record["dequantized_bits_per_dim"] = {**stat_record(summary.dequantized_bits_per_dim), "note": DEQUANTIZATION}
    if summary.sequences is not None:
        record["sequences"] = sequences_record(summary.sequences)
    record["diagnostics"] = diagnostics_record(evaluation)
    return record


def sequences_record(sequences: SequenceSummary) -> dict[str, Any]:
    """The ``summary.sequences`` object: the data set per token, where the points are padded sequences."""
    return {"tokens": sequences.tokens, **{key: stat_record(getattr(sequences, key)) for key in SEQUENCE_KEYS},
            "note": sequence_note(sequences)}


SEQUENCE_KEYS = ("nll_per_token", "perplexity", "bits_per_token", "elbo_nll_per_token", "elbo_perplexity")


def point_records(points: PointResults, samples: int, monte_carlo_kl: bool) -> list[dict[str, Any]]:
    """One JSON object per point (the ``points`` list of a document, and the point lines of a results file).

    Args:
        points: the per-point results.
        samples: K, for the ESS fraction.
        monte_carlo_kl: the KL was estimated from the samples: add its standard error.
    """
    values = {name: getattr(points, name) for name in POINT_NUMBERS}
    if monte_carlo_kl:
        values["kl_stderr"] = points.kl_stderr
    if points.tokens is not None:
        values["tokens"] = points.tokens
    return POINT_COLUMNS.records(points.index, {**values, "ess_fraction": points.ess / samples, "unreliable": points.unreliable})


# ---------------------------------------------------------------- records -> results


def points_from_records(records: Sequence[dict[str, Any]]) -> PointResults:
    """Per-point results from point records (``null`` numbers become NaN), sorted by index."""
    arrays = POINT_COLUMNS.arrays(records, defaults={"kl_stderr": 0.0})
    tokens = None if any(record.get("tokens") is None for record in records) else arrays["tokens"].astype(np.int64)
    return PointResults(**{name: arrays[name] for name in ("index", *POINT_NUMBERS, "kl_stderr", "unreliable")}, tokens=tokens)


def evaluation_from_records(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> Evaluation:
    """The evaluation the point records of one run (or all its shards) add up to.

    Args:
        header: a results file's header (``stream.header_record``): settings, scoring, model and data.
        records: point records, in any order.
    """
    return evaluation_of(
        points_from_records(records),
        settings=Settings(**header["settings"]),
        scoring=Scoring(**header["scoring"]),
        kl_kind=header["kl_kind"],
        domain=domain_from_spec(header["domain"]),
        dims=header["model"]["dims"],
    )



# ---------------------------------------------------------------- AIS and BDMC

FROM_PRIOR = "the chains started from p(z), not q(z|x) (--init prior, or --init auto's choice for the point)"
# AIS's point columns (``ais``).
AIS_COLUMNS = PointColumns((
    Column("ais", NUMBER, "the AIS estimate of log p(x): the log of the mean of the chains' weights"),
    Column("ais_stderr", MAYBE_NUMBER, "its delta-method standard error over the chains"),
    Column("acceptance", MAYBE_NUMBER, "the HMC acceptance rate over steps and chains"),
    Column("elbo", NUMBER, "the ELBO of the same point, beside it"),
    Column("iwae", NUMBER, "the IWAE of the same point, beside it"),
    Column("ess", MAYBE_NUMBER, "the effective sample size of the chains' weights"),
    Column("step_size", MAYBE_NUMBER, "the mean HMC step size used"),
    Column("tokens", COUNT, "the positions of a padded sequence that count (--lengths)", optional=True),
    Column("from_prior", FLAG, FROM_PRIOR, optional=True),
))
# BDMC's point columns (``bdmc``): a simulated point's sandwich.
BDMC_COLUMNS = PointColumns((
    Column("lower", MAYBE_NUMBER, "forward AIS: a stochastic lower bound on log p(x)"),
    Column("upper", MAYBE_NUMBER, "reverse AIS from the z that made the point: a stochastic upper bound"),
    Column("gap", MAYBE_NUMBER, "upper - lower"),
    Column("iwae", MAYBE_NUMBER, "the IWAE of the same point"),
    Column("acceptance", MAYBE_NUMBER, "the HMC acceptance rate"),
    Column("from_prior", FLAG, FROM_PRIOR, optional=True),
))
BDMC_POINT_NUMBERS = BDMC_COLUMNS.numbers + BDMC_COLUMNS.maybe_numbers  # what the summary averages


def ais_settings_record(settings: AISSettings) -> dict[str, Any]:
    """The ``settings`` object of an AIS or BDMC document."""
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


def cost_record(cost: AISCost) -> dict[str, Any]:
    """Decoder gradient evaluations per point: the pilot's, the run's, and the pilot's share."""
    return {"pilot_gradients": cost.pilot, "gradients": cost.run, "pilot_share": cost.pilot_share}


def column_records(columns: PointColumns, points: Columns) -> list[dict[str, Any]]:
    """The point objects of per-point results whose attributes are the columns' (an optional one the points
    have not, None, left out)."""
    values = {name: getattr(points, name) for name in columns.names()}
    return columns.records(points.index, {name: value for name, value in values.items() if value is not None})


def ais_point_records(points: AISPointResults) -> list[dict[str, Any]]:
    """One JSON object per point of an AIS run (the ``points`` list, and a results file's point lines)."""
    return column_records(AIS_COLUMNS, points)


def ais_summary_record(evaluation: AISEvaluation) -> dict[str, Any]:
    """The ``summary`` object of a ``vaeeval.ais/1`` document."""
    summary = evaluation.summary
    return {
        "n": summary.n,
        "measure": evaluation.measure,
        "scoring": scoring_record(evaluation.scoring),
        **{name: stat_record(getattr(summary, name)) for name in ("ais", "elbo", "iwae")},
        "ais_minus_iwae": stat_record(summary.gap),
        "ais_stderr": stat_record(summary.ais_stderr),
        "acceptance": stat_record(summary.acceptance),
        "bits_per_dim": stat_record(summary.bits_per_dim),
        **({} if summary.sequences is None else {"sequences": sequences_record(summary.sequences)}),
        "prior_starts": prior_starts(evaluation.points),
        "cost": cost_record(evaluation.cost),
    }


def prior_starts(points: AISPointResults | BDMCPointResults) -> int | None:
    """How many points' chains started from p(z) (None where the results do not say: an older results file)."""
    return None if points.from_prior is None else int(np.count_nonzero(points.from_prior))


def bdmc_point_records(points: BDMCPointResults) -> list[dict[str, Any]]:
    """One JSON object per simulated point of a BDMC run."""
    return column_records(BDMC_COLUMNS, points)


def bdmc_summary_record(evaluation: BDMCEvaluation) -> dict[str, Any]:
    """The ``summary`` object of a ``vaeeval.bdmc/1`` document."""
    summary = evaluation.summary
    return {
        "n": summary.n,
        "measure": evaluation.measure,
        "scoring": scoring_record(evaluation.scoring),
        **{name: stat_record(getattr(summary, name)) for name in BDMC_POINT_NUMBERS},
        "gap_limit": GAP_LIMIT,
        "weak": evaluation.weak,
        "prior_starts": prior_starts(evaluation.points),
        "cost": cost_record(evaluation.cost),
    }


def ais_points_from_records(records: Sequence[dict[str, Any]]) -> AISPointResults:
    """Per-point AIS results from point records (``null`` numbers become NaN), sorted by index."""
    arrays = AIS_COLUMNS.arrays(records)
    tokens = None if any(record.get("tokens") is None for record in records) else arrays["tokens"].astype(np.int64)
    return AISPointResults(**{**arrays, "tokens": tokens})


def ais_evaluation_from_records(header: dict[str, Any], records: Sequence[dict[str, Any]]) -> AISEvaluation:
    """The AIS evaluation the point records of one run (or all its shards) add up to."""
    points = ais_points_from_records(records)
    return AISEvaluation(
        points=points,
        summary=summarize_ais(points, header["model"]["dims"]),
        settings=AISSettings(**header["settings"]),
        scoring=Scoring(**header["scoring"]),
        domain=domain_from_spec(header["domain"]),
        cost=AISCost(header["cost"]["pilot_gradients"], header["cost"]["gradients"]),
    )
