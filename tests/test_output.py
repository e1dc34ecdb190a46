"""vaeeval.output: records, documents and their schemas, JSON without NaN, the progress bar, the plot."""

from __future__ import annotations

import importlib
import io
import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from conftest import cli, jsonl
from rich.console import Console
from torch import nn

import vaeeval.output.plot
from vaeeval import evaluate, load_data, save_model
from vaeeval.format.domains import DOMAINS
from vaeeval.output.progress import ProgressBar
from vaeeval.results import schemas
from vaeeval.results.latents import latent_health
from vaeeval.results.numbers import PointResults
from vaeeval.results.records import (
    SCORING_KEYS,
    SETTINGS_KEYS,
    data_record,
    diagnostics_record,
    latents_record,
    model_record,
    point_records,
    points_from_records,
    summary_record,
    to_json,
)
from vaeeval.results.schemas import schema, schema_names


def validate(document, name):
    jsonschema.Draft202012Validator(schema(name)).validate(document)


# ---------------------------------------------------------------- JSON and the progress bar


def test_json_refuses_nan_and_infinity():
    with pytest.raises(ValueError):
        to_json({"x": math.nan})
    with pytest.raises(ValueError):
        to_json({"x": -math.inf})


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=100), buffer


def test_progress_bar_appears_after_its_delay():
    console, buffer = _console()
    with ProgressBar(10, "evaluating points", lambda: console, delay=0.0) as progress:
        progress(5)
        progress(10)
    assert "evaluating points" in buffer.getvalue()


def test_short_runs_show_no_progress_bar_and_never_load_rich():
    console, buffer = _console()
    asked = []
    with ProgressBar(10, "evaluating points", lambda: asked.append(1) or console, delay=3600.0) as progress:
        progress(10)
    assert buffer.getvalue() == "" and not asked


def test_a_json_run_imports_no_rich():
    """--json output needs no table: the command's start-up leaves rich unloaded (about 20 ms)."""
    import subprocess
    import sys

    code = ("import sys; from vaeeval.cli import main; main.get_command(None, 'elbo'); "
            "print(sorted(m for m in sys.modules if m.startswith('rich.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


# ---------------------------------------------------------------- records


@pytest.fixture
def evaluation(bernoulli_model, binary_data):
    return evaluate(bernoulli_model, load_data(binary_data, bernoulli_model), samples=16)


@pytest.mark.parametrize("monte_carlo_kl", [False, True])
def test_point_records_read_back_to_the_same_points(evaluation, monte_carlo_kl):
    """Every number comes back, in index order; JSON has no NaN or infinity, so those are null and come back NaN."""
    points = evaluation.points
    khat = np.where(points.index == 1, np.nan, np.where(points.index == 2, np.inf, 0.25 * points.index))
    odd = PointResults(**{**vars(points), "khat": khat})
    records = point_records(odd, 16, monte_carlo_kl)
    assert records[1]["khat"] is None and records[2]["khat"] is None and records[3]["khat"] == 0.75
    again = points_from_records(records[::-1])
    for name, values in vars(odd).items():
        if values is None:  # tokens: only padded sequences (--lengths) have them
            assert getattr(again, name) is None, name
            continue
        expected = values if values.dtype.kind != "f" else np.where(np.isfinite(values), values, np.nan)
        assert np.array_equal(getattr(again, name), expected, equal_nan=True), name


# ---------------------------------------------------------------- schemas


def test_every_schema_is_a_valid_schema_and_printable():
    for name in schema_names():
        jsonschema.Draft202012Validator.check_schema(schema(name))
        assert json.loads(cli("schema", name).stdout) == schema(name)
    assert "vaeeval.elbo/1" in cli("schema").stdout.split()
    assert cli("schema", "nope", code=2).stderr.startswith("vaeeval: error: no schema 'nope'")


def test_every_output_validates(bernoulli_model, second_model, binary_data, tmp_path):
    model, data = bernoulli_model.path, binary_data
    validate(json.loads(cli("elbo", model, data, "-k", "16", "--json").stdout), "vaeeval.elbo/1")
    full = json.loads(cli("elbo", model, data, "-k", "16", "--json", "--convergence", "--diagnostics").stdout)
    validate(full, "vaeeval.elbo/1")
    validate(json.loads(cli("compare", model, second_model.path, data, "-k", "16", "--json").stdout), "vaeeval.compare/1")
    validate(json.loads(cli("inspect", model, "--json").stdout), "vaeeval.inspect/1")
    validate(json.loads(cli("latents", model, data, "-k", "8", "--json").stdout), "vaeeval.latents/1")
    (tmp_path / "a.json").write_text(cli("elbo", model, data, "-k", "16", "--json").stdout)
    validate(json.loads(cli("check", tmp_path / "a.json", "--baseline", tmp_path / "a.json", "--json").stdout), "vaeeval.check/1")
    cli("elbo", model, data, "-k", "16", "--output", tmp_path / "r.jsonl")
    for line in jsonl(tmp_path / "r.jsonl"):
        validate(line, "vaeeval.elbo-stream/1")
    # a density model (dequantized bits/dim) and a mixture prior (kl_stderr) validate too
    torch.manual_seed(0)
    mixture = save_model(
        tmp_path / "mix.safetensors", nn.Sequential(nn.Linear(6, 4)), nn.Sequential(nn.Linear(2, 6)),
        likelihood={"family": "gaussian", "sigma": 0.5}, input_shape=[6], latent_dim=2,
        prior={"family": "mixture_of_gaussians", "logits": torch.zeros(2), "means": torch.randn(2, 2), "log_vars": torch.zeros(2, 2)},
    )
    document = json.loads(cli("elbo", mixture.path, data, "-k", "16", "--json", "--density").stdout)
    validate(document, "vaeeval.elbo/1")
    assert "kl_stderr" in document["points"][0] and "dequantized_bits_per_dim" in document["summary"]


def _keys(part: dict) -> tuple[set[str], set[str]]:
    return set(part["properties"]), set(part["required"])


def test_the_point_schema_has_the_keys_of_a_point_record(evaluation):
    monte_carlo, analytic = (set(point_records(evaluation.points, 16, kl)[0]) for kl in (True, False))
    assert monte_carlo == analytic | {"kl_stderr"}
    assert _keys(schemas.POINT) == (monte_carlo | {"tokens"}, analytic)  # tokens: padded sequences (test_sequences.py)


def test_the_settings_scoring_and_domain_schemas_have_the_record_keys():
    assert _keys(schemas.SETTINGS) == (set(SETTINGS_KEYS), set(SETTINGS_KEYS))
    assert _keys(schemas.SCORING) == (set(SCORING_KEYS), set(SCORING_KEYS))
    assert schemas.DOMAIN["properties"]["domain"]["enum"] == list(DOMAINS)


def test_the_summary_data_and_latents_schemas_have_the_record_keys(evaluation, bernoulli_model, binary_data):
    dequantized = {"dequantized_bits_per_dim", "recon_terms"}  # a density on discrete data; documents (not file lines)
    dequantized.add("sequences")  # padded sequences (--lengths): test_sequences.py validates a document holding it
    assert _keys(schemas.SUMMARY) == (set(summary_record(evaluation)) | dequantized, set(summary_record(evaluation)))
    assert set(schemas.DIAGNOSTICS["properties"]) == set(diagnostics_record(evaluation))
    assert set(schemas.DATA["properties"]) == set(data_record(load_data(binary_data, bernoulli_model)))
    health = latent_health(evaluation.latent_means, evaluation.latent_vars, evaluation.points.kl, bernoulli_model.prior, 0)
    assert _keys(schemas.LATENTS) == (set(latents_record(health)) | {"groups"}, set(latents_record(health)))  # groups: hierarchical


def test_the_model_schema_has_the_keys_of_a_model_record(bernoulli_model):
    assert set(schemas.MODEL["properties"]) == set(model_record(bernoulli_model))


# ---------------------------------------------------------------- plot


def test_plotting_leaves_the_matplotlib_backend_as_it_was(evaluation, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        plot = importlib.reload(vaeeval.output.plot)  # importing it chooses no backend...
        assert matplotlib.get_backend() == "pdf"
        plot.plot_diagnostics(evaluation, tmp_path / "p.png")  # ...and neither does drawing
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
