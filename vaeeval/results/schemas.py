"""JSON Schemas (draft 2020-12) of every ``--json`` output and of results files.

They state the contract: the keys CI scripts may rely on are ``required``;
every object allows more keys, since later versions may add them (never rename).
``vaeeval schema NAME`` prints one.
"""

from __future__ import annotations

import json
from typing import Any

from vaeeval.errors import VaeevalError
from vaeeval.format.domains import DOMAINS
from vaeeval.format.terms import GIVEN_DRAWS, KL_KINDS, MEASURES
from vaeeval.results.formats import FORMATS, ResultsFormat
from vaeeval.results.numbers import METRICS
from vaeeval.results.records import AIS_COLUMNS, BDMC_COLUMNS, BDMC_POINT_NUMBERS, POINT_COLUMNS, SEQUENCE_KEYS

ELBO_SCHEMA = "vaeeval.elbo/1"
COMPARE_SCHEMA = "vaeeval.compare/1"
CHECK_SCHEMA = "vaeeval.check/1"
LATENTS_SCHEMA = "vaeeval.latents/1"
INSPECT_SCHEMA = "vaeeval.inspect/1"
STREAM_SCHEMA = "vaeeval.elbo-stream/1"
AIS_SCHEMA = "vaeeval.ais/1"
AIS_STREAM_SCHEMA = "vaeeval.ais-stream/1"
BDMC_SCHEMA = "vaeeval.bdmc/1"
CALIBRATE_SCHEMA = "vaeeval.calibrate/1"

_DRAFT = "https://json-schema.org/draft/2020-12/schema"
NUMBER = {"type": "number"}
MAYBE_NUMBER = {"type": ["number", "null"]}
INTEGER = {"type": "integer", "minimum": 0}
STRING = {"type": "string"}
MAYBE_STRING = {"type": ["string", "null"]}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": {**required, **(optional or {})}}


STAT = _object({"mean": MAYBE_NUMBER, "stderr": MAYBE_NUMBER})
MEASURE = {"enum": list(MEASURES)}
KL_KIND = {"enum": list(KL_KINDS)}

RANGE = {"type": "array", "items": NUMBER, "minItems": 2, "maxItems": 2}
DOMAIN = _object({"domain": {"enum": list(DOMAINS)}}, {"levels": INTEGER, "range": RANGE})
MODEL = _object(
    {
        "path": MAYBE_STRING,
        "family": STRING,
        "likelihood": {"type": "object", "required": ["family"]},
        "measure": MEASURE,
        "prior": {"type": "object", "required": ["family"]},
        "latent_dim": {"type": "integer", "minimum": 1},
        "input_shape": {"type": "array", "items": {"type": "integer", "minimum": 1}},
        "dims": {"type": "integer", "minimum": 1},
        "parameters": INTEGER,
    },
    {
        "format": {"enum": [1, None]},
        "arch": MAYBE_STRING,
        "digest": MAYBE_STRING,
        "description": STRING,
        "kl": KL_KIND,
        "domain": {"anyOf": [DOMAIN, {"type": "null"}]},
        "notes": {"type": "array", "items": STRING},
        "covariates": {"type": "array", "items": STRING},
        "library": {"enum": ["observed", "latent", None]},
        "data_layer": MAYBE_STRING,
        "scale": {"anyOf": [_object({"shared": MAYBE_NUMBER, "log_sum": NUMBER}), {"type": "null"}]},
    },
)
DATA = _object(
    {
        "path": MAYBE_STRING,
        "n": INTEGER,
        "total": INTEGER,
        "shape": {"type": "array", "items": INTEGER},
        "dims": INTEGER,
        "domain": DOMAIN,
        "digest": STRING,
    },
    {"key": MAYBE_STRING, "covariates": {"type": "array", "items": STRING}, "layer": MAYBE_STRING},
)
SETTINGS = _object(
    {
        "samples": {"type": "integer", "minimum": 1},
        "seed": INTEGER,
        "batch_size": {"type": "integer", "minimum": 1},
        "chunk_size": {"type": "integer", "minimum": 1},
        "device": STRING,
    }
)
SCORING = _object(
    {
        "measure": MEASURE,
        "levels": {"type": ["integer", "null"]},
        "data_levels": {"type": ["integer", "null"]},
        "note": STRING,
        "range": RANGE,
    },
)
DIAGNOSTICS = _object(
    {
        "unreliable": _object(
            {"count": INTEGER, "share": NUMBER, "khat_threshold": MAYBE_NUMBER, "points": {"type": "array", "items": INTEGER}}
        ),
        "iwae_minus_elbo": STAT,
        "ess": STAT,
        "ess_fraction": STAT,
        "khat": STAT,
        "elbo_stderr": STAT,
        "iwae_stderr": STAT,
    }
)
NAMED_STAT = _object({"name": STRING, "mean": MAYBE_NUMBER, "stderr": MAYBE_NUMBER})
RECON_TERMS = _object(
    {"family": STRING, "terms": {"anyOf": [{"type": "array", "items": NAMED_STAT}, {"type": "null"}]}},
    {
        "form": STRING, "why": STRING, "note": STRING,
        "loss": {"anyOf": [NAMED_STAT, {"type": "null"}]}, "weighted_loss": NAMED_STAT,
        "mse_per_dim": {"anyOf": [STAT, {"type": "null"}]}, "mae_per_dim": {"anyOf": [STAT, {"type": "null"}]},
        "implied_sigma": _object({"in_file": MAYBE_NUMBER, "fitted_by_calibrate": MAYBE_NUMBER,
                                  "sum_reduced_mse": NUMBER, "mean_reduced_mse": NUMBER}),
        "bin_width": MAYBE_NUMBER, "levels": {"type": ["integer", "null"], "minimum": 2},
        # per point, in the order of the document's points: each term that varies by point, and the losses, by name
        "points": {"type": "object", "additionalProperties": {"type": "array", "items": MAYBE_NUMBER}},
    },
)
SUMMARY = _object(
    {
        "n": INTEGER,
        "measure": MEASURE,
        "scoring": SCORING,
        "kl_kind": KL_KIND,
        **dict.fromkeys(METRICS, STAT),
        "bits_per_dim": STAT,
        "diagnostics": DIAGNOSTICS,
    },
    {
        "dequantized_bits_per_dim": {**STAT, "properties": {**STAT["properties"], "note": STRING}},
        "recon_terms": RECON_TERMS,  # in --json documents, not in a results file's summary line
        "sequences": _object({"tokens": INTEGER, **dict.fromkeys(SEQUENCE_KEYS, STAT), "note": STRING}),  # with --lengths
    },
)
POINT = POINT_COLUMNS.schema()
LATENTS = _object(
    {
        "kl_per_dim": {"type": ["array", "null"], "items": NUMBER},
        "activity": {"type": "array", "items": NUMBER},
        "active_threshold": NUMBER,
        "active_units": INTEGER,
        "inactive": {"type": "array", "items": INTEGER},
        "mutual_information": NUMBER,
        "mutual_information_max": NUMBER,
        "mean_kl": NUMBER,
        "aggregate_kl": NUMBER,
        "warning": MAYBE_STRING,
    },
    {
        "groups": {"type": "array", "items": _object({
            "name": STRING,
            "units": {"type": "array", "items": INTEGER, "minItems": 2, "maxItems": 2},
            "active_units": INTEGER,
            "kl": MAYBE_NUMBER,
            "kl_stderr": MAYBE_NUMBER,
            "kl_kind": {"enum": [*KL_KINDS, GIVEN_DRAWS, None]},
        })},
    },
)
CONVERGENCE = {"type": "array", "items": _object({"samples": {"type": "integer", "minimum": 1}, "iwae": STAT})}


def _document(name: str, title: str, required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    body = _object({"schema": {"const": name}, **required}, optional)
    return {"$schema": _DRAFT, "$id": name, "title": title, **body}


SHARD = {"type": ["object", "null"], "required": ["index", "count", "start", "stop"]}
POSITIVE = {"type": "integer", "minimum": 1}
AIS_SETTINGS = _object(
    {
        "steps": POSITIVE,
        "leapfrog": POSITIVE,
        "chains": POSITIVE,
        "init": {"enum": ["encoder", "prior", "auto"]},
        "schedule": {"enum": ["sigmoid", "linear", "geometric", "adaptive"]},
        "step_size": MAYBE_NUMBER,
        "pilot_chains": POSITIVE,
        "seed": INTEGER,
        "samples": POSITIVE,
        "batch_size": POSITIVE,
        "device": STRING,
    },
    {"mass": {"enum": ["identity", "diagonal"]}},
)
COST = _object({"pilot_gradients": INTEGER, "gradients": INTEGER, "pilot_share": NUMBER})
AIS_POINT = AIS_COLUMNS.schema()
CERTIFICATE_STAGE = _object(
    {"steps": INTEGER, "leapfrog": INTEGER, "gap": STAT, "upper": MAYBE_NUMBER, "cost": INTEGER, "seconds": NUMBER}
)
CERTIFICATE = _object(
    {"target_gap": NUMBER, "reached": {"type": "boolean"}, "steps": INTEGER, "leapfrog": INTEGER, "gap": STAT,
     "upper": MAYBE_NUMBER, "simulated_points": INTEGER, "max_cost": {"type": ["integer", "null"]},
     "max_seconds": MAYBE_NUMBER, "cost": INTEGER, "seconds": NUMBER,
     "stages": {"type": "array", "items": CERTIFICATE_STAGE, "minItems": 1}}
)
PRIOR_STARTS = {"type": ["integer", "null"], "minimum": 0}  # points whose chains started from p(z); null: not recorded
AIS_SUMMARY = _object(
    {
        "n": INTEGER,
        "measure": MEASURE,
        "scoring": SCORING,
        "ais": STAT,
        "elbo": STAT,
        "iwae": STAT,
        "ais_minus_iwae": STAT,
        "ais_stderr": STAT,
        "acceptance": STAT,
        "bits_per_dim": STAT,
        "cost": COST,
    },
    {"sequences": _object({"tokens": INTEGER, **dict.fromkeys(SEQUENCE_KEYS, STAT), "note": STRING}),  # with --lengths
     "prior_starts": PRIOR_STARTS},
)
BDMC_POINT = BDMC_COLUMNS.schema()
BDMC_SUMMARY = _object(
    {
        "n": INTEGER,
        "measure": MEASURE,
        "scoring": SCORING,
        **dict.fromkeys(BDMC_POINT_NUMBERS, STAT),
        "gap_limit": NUMBER,
        "weak": {"type": "boolean"},
        "cost": COST,
    },
    {"prior_starts": PRIOR_STARTS},
)
SIMULATED = _object(
    {"n": POSITIVE, "domain": DOMAIN, "levels": {"type": ["integer", "null"]}, "seed": INTEGER},
    {"saved": MAYBE_STRING, "range": {"type": ["array", "null"], "items": NUMBER, "minItems": 2, "maxItems": 2}},
)
_SCHEMAS: dict[str, dict[str, Any]] = {schema["$id"]: schema for schema in (
    _document(
        ELBO_SCHEMA,
        "vaeeval elbo --json: per-point and summary ELBO, reconstruction, KL and IWAE, in nats",
        {"model": MODEL, "data": DATA, "settings": SETTINGS, "summary": SUMMARY, "points": {"type": "array", "items": POINT}},
        {"units": STRING, "convergence": CONVERGENCE, "latents": LATENTS, "notes": {"type": "array", "items": STRING}},
    ),
    _document(
        COMPARE_SCHEMA,
        "vaeeval compare --json: several models on the same points, ranked where comparable",
        {
            "data": DATA,
            "settings": {"anyOf": [SETTINGS, AIS_SETTINGS]},
            "models": {
                "type": "array",
                "items": _object(
                    {"model": MODEL, "rank": {"type": ["integer", "null"]}, "summary": {"anyOf": [SUMMARY, AIS_SUMMARY]},
                     "points": {"type": "array", "items": {"anyOf": [POINT, AIS_POINT]}}}
                ),
            },
            "rankings": {
                "type": "array",
                "items": _object(
                    {"measure": STRING, "ranked": {"type": "boolean"}, "order": {"type": "array", "items": STRING},
                     "reason": MAYBE_STRING}
                ),
            },
            "differences": {
                "type": "array",
                "items": _object(
                    {"model": STRING, "versus": STRING, "metric": STRING, "mean": NUMBER, "stderr": MAYBE_NUMBER,
                     "unpaired_stderr": MAYBE_NUMBER}
                ),
            },
            "notes": {"type": "array", "items": STRING},
        },
        {"units": STRING, "estimator": {"enum": ["iwae", "ais"]}, "certificates": {"type": "array", "items": CERTIFICATE}},
    ),
    _document(
        CALIBRATE_SCHEMA,
        "vaeeval calibrate --json: the likelihood's scale fitted on held-out data by the ELBO, and what it changed",
        {
            "model": MODEL, "data": DATA, "family": {"enum": ["gaussian", "laplace"]}, "parameter": {"enum": ["sigma", "scale"]},
            "per_dimension": {"type": "boolean"},
            "fitted": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "array", "items": NUMBER}]},
            "output": STRING, "samples": {"type": "integer", "minimum": 1}, "seed": INTEGER,
            "before": _object({"elbo": MAYBE_NUMBER, "iwae": MAYBE_NUMBER}),
            "after": _object({"elbo": MAYBE_NUMBER, "iwae": MAYBE_NUMBER}),
        },
        {"units": STRING, "note": STRING, "arch_options": {"type": ["array", "null"], "items": STRING}},
    ),
    _document(
        INSPECT_SCHEMA,
        "vaeeval inspect --json: a model file's layers, likelihood, prior and data domain",
        {
            "model": MODEL,
            "layers": {
                "type": "array",
                "items": _object(
                    {"part": {"enum": ["encoder", "decoder"]}, "index": INTEGER, "type": STRING, "detail": STRING,
                     "output_shape": {"type": "array", "items": INTEGER}, "parameters": INTEGER}
                ),
            },
        },
    ),
    _document(
        LATENTS_SCHEMA,
        "vaeeval latents --json: latent health",
        {"model": MODEL, "data": DATA, "settings": SETTINGS, "latents": LATENTS},
    ),
    _document(
        CHECK_SCHEMA,
        "vaeeval check --json: a run against its baseline, paired over the same points",
        {
            "metric": STRING, "new": NUMBER, "baseline": NUMBER, "difference": STAT, "points": INTEGER,
            "tolerance": NUMBER, "confidence": NUMBER, "passed": {"type": "boolean"}, "reason": STRING,
        },
    ),
    {
        "$schema": _DRAFT,
        "$id": STREAM_SCHEMA,
        "title": "one line of a results file (elbo --output): the header, a point, or the final summary",
        "oneOf": [
            _object(
                {"kind": {"const": "header"}, "schema": {"const": STREAM_SCHEMA}, "model": MODEL,
                 "data": DATA, "settings": SETTINGS, "scoring": SCORING,
                 "kl_kind": KL_KIND, "domain": DOMAIN, "shard": SHARD}
            ),
            _object({"kind": {"const": "summary"}, "summary": SUMMARY}),
            {**POINT, "not": {"required": ["kind"]}},
        ],
    },
    _document(
        AIS_SCHEMA,
        "vaeeval ais --json: per-point annealed importance sampling estimates of log p(x), with ELBO and IWAE",
        {"model": MODEL, "data": DATA, "settings": AIS_SETTINGS, "summary": AIS_SUMMARY,
         "points": {"type": "array", "items": AIS_POINT}},
        {"units": STRING, "certificate": CERTIFICATE},
    ),
    _document(
        BDMC_SCHEMA,
        "vaeeval bdmc --json: forward and reverse AIS on points simulated from the model, a sandwich of log p(x)",
        {"model": MODEL, "data": SIMULATED, "settings": AIS_SETTINGS, "summary": BDMC_SUMMARY,
         "points": {"type": "array", "items": BDMC_POINT}},
        {"units": STRING},
    ),
    {
        "$schema": _DRAFT,
        "$id": AIS_STREAM_SCHEMA,
        "title": "one line of an AIS results file (ais --output): the header, a point, or the final summary",
        "oneOf": [
            _object(
                {"kind": {"const": "header"}, "schema": {"const": AIS_STREAM_SCHEMA}, "model": MODEL,
                 "data": DATA, "settings": AIS_SETTINGS, "scoring": SCORING, "domain": DOMAIN, "cost": COST,
                 "shard": SHARD}
            ),
            _object({"kind": {"const": "summary"}, "summary": AIS_SUMMARY}),
            {**AIS_POINT, "not": {"required": ["kind"]}},
        ],
    },
)}


def _run_schemas(results: ResultsFormat) -> dict[str, dict[str, Any]]:
    """The schemas of a registered estimator with none written here: its ``--json`` document and its
    results file's lines, from its point columns (settings and summary are its own objects)."""
    point = results.columns.schema()
    return {
        results.document: _document(
            results.document,
            f"a run of the estimator whose results files are {results.schema} (vaeeval merge --json)",
            {"model": MODEL, "data": DATA, "settings": {"type": "object"}, "summary": {"type": "object"},
             "points": {"type": "array", "items": point}},
            {"units": STRING},
        ),
        results.schema: {
            "$schema": _DRAFT,
            "$id": results.schema,
            "title": f"one line of a {results.schema} results file: the header, a point, or the final summary",
            "oneOf": [
                _object({"kind": {"const": "header"}, "schema": {"const": results.schema}, "model": MODEL, "data": DATA,
                         "settings": {"type": "object"}, "shard": SHARD}),
                _object({"kind": {"const": "summary"}, "summary": {"type": ["object", "null"]}}),
                {**point, "not": {"required": ["kind"]}},
            ],
        },
    }


def _every_schema() -> dict[str, dict[str, Any]]:
    """The schemas written here, then those of every other registered estimator."""
    found = dict(_SCHEMAS)
    for results in FORMATS.values():
        if results.document not in found:
            found.update(_run_schemas(results))
    return found


def schema_names() -> tuple[str, ...]:
    """Every schema's name, e.g. ``vaeeval.elbo/1``."""
    return tuple(_every_schema())


def schema(name: str) -> dict[str, Any]:
    """The schema called ``name`` (``vaeeval.elbo/1``, or just ``elbo``).

    Raises:
        VaeevalError: no such schema.
    """
    schemas = _every_schema()
    full = name if name in schemas else f"vaeeval.{name}/1"
    if full not in schemas:
        raise VaeevalError(f"no schema {name!r}; vaeeval has {', '.join(schemas)}")
    return schemas[full]


def schema_text(name: str) -> str:
    """The schema as indented JSON text, ending in a newline."""
    return json.dumps(schema(name), indent=2) + "\n"
