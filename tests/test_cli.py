"""The command line: JSON contract, tables, determinism through the CLI, and the README's quick start."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from vaeeval import evaluate, load_data
from vaeeval.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr + repr(result.exception)
    return result


def test_elbo_json_is_the_documented_contract(bernoulli_model, binary_data):
    out = run("elbo", bernoulli_model.path, binary_data, "-k", "100", "--seed", "4", "--json")
    document = json.loads(out.stdout)  # stdout is exactly one JSON document
    assert document["schema"] == "vaeeval.elbo/1"
    assert document["settings"]["samples"] == 100 and document["settings"]["seed"] == 4
    assert document["model"]["family"] == "bernoulli" and document["model"]["measure"] == "probability"
    assert document["data"]["n"] == 23 and document["data"]["dims"] == 6
    for name in ("elbo", "recon", "kl", "iwae"):
        assert set(document["summary"][name]) >= {"mean", "stderr"}
    assert [p["index"] for p in document["points"]] == list(range(23))
    assert set(document["points"][0]) >= {"index", "elbo", "recon", "kl", "iwae"}
    expected = evaluate(bernoulli_model, load_data(binary_data, bernoulli_model), samples=100, seed=4)
    assert [p["iwae"] for p in document["points"]] == expected.points.iwae.tolist()
    assert document["summary"]["iwae"]["mean"] == expected.summary.iwae.mean
    assert "NaN" not in out.stdout and "Infinity" not in out.stdout


def test_table_shows_header_summary_first_and_worst(bernoulli_model, binary_data):
    out = run("elbo", bernoulli_model.path, binary_data, "-k", "50").stdout
    for phrase in ("bernoulli, reported as probability", "latent dim", "N = 23 points, D = 6 dims", "K = 50, seed 0",
                   "bits/dim", "First 5 and worst 5 points by iwae", "log-probabilities"):
        assert phrase in out, phrase
    rows = re.findall(r"│\s+(?:first|worst)?\s*│\s+(\d+) │", out)
    assert len(rows) == 10
    every, trust = run("elbo", bernoulli_model.path, binary_data, "-k", "50", "--all").stdout.split("Trust per point")
    assert sorted(int(i) for i in re.findall(r"│\s+│\s+(\d+) │", every)) == list(range(23))
    assert sorted(int(i) for i in re.findall(r"│\s+│\s+(\d+) │", trust)) == list(range(23))
    assert "k-hat" in trust and "ESS/K" in trust


def test_json_carries_the_diagnostics_contract(bernoulli_model, binary_data, tmp_path):
    result = CliRunner().invoke(
        main,
        ["elbo", str(bernoulli_model.path), str(binary_data), "-k", "100", "--json", "--convergence", "--diagnostics",
         "--plot", str(tmp_path / "p.png")],
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    point = document["points"][0]
    assert {"elbo_stderr", "iwae_stderr", "ess", "khat", "unreliable"} <= set(point)
    assert isinstance(point["unreliable"], bool)
    diagnostics = document["summary"]["diagnostics"]
    assert set(diagnostics["unreliable"]) == {"count", "share", "khat_threshold", "points"}
    assert diagnostics["iwae_minus_elbo"]["mean"] > 0
    assert [step["samples"] for step in document["convergence"]] == [1, 10, 100]
    assert document["latents"]["active_units"] + len(document["latents"]["inactive"]) == 2
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = CliRunner().invoke(main, ["latents", str(bernoulli_model.path), str(binary_data), "-k", "20"])
    assert table.exit_code == 0 and "Latent units" in table.stdout and "I(x; z)" in table.stdout
    plain = json.loads(CliRunner().invoke(main, ["elbo", str(bernoulli_model.path), str(binary_data), "-k", "8", "--json"]).stdout)
    assert "convergence" not in plain and "latents" not in plain


def test_limit_and_npz_key(bernoulli_model, binary_data, tmp_path):
    np.savez(tmp_path / "d.npz", train=np.zeros((3, 6)), test=np.load(binary_data))
    document = json.loads(
        run("elbo", bernoulli_model.path, tmp_path / "d.npz", "--key", "test", "--limit", "4", "-k", "8", "--json").stdout
    )
    assert document["data"]["n"] == 4 and document["data"]["total"] == 23 and document["data"]["key"] == "test"


def test_inspect_table_and_json(bernoulli_model):
    table = run("inspect", bernoulli_model.path).stdout
    for phrase in ("encoder", "decoder", "linear", "tanh", "bernoulli", "binary data (0 or 1)", "parameters"):
        assert phrase in table
    document = json.loads(run("inspect", bernoulli_model.path, "--json").stdout)
    assert document["schema"] == "vaeeval.inspect/1"
    assert [layer["output_shape"] for layer in document["layers"]] == [[16], [16], [4], [16], [16], [6]]
    assert document["model"]["parameters"] == bernoulli_model.parameter_count


def test_help_has_examples():
    assert "Example:" in run("elbo", "--help").stdout
    assert "Example:" in run("inspect", "--help").stdout
    help_text = " ".join(run("elbo", "--help").stdout.split())
    assert "RUNS USER CODE" in help_text and "Without --arch nothing from any file is executed" in help_text


def _quick_start_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s*\n+```(?:sh|bash)?\n(.*?)```", readme, re.S)
    assert block, "README.md has a Quick start heading followed by a code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_quick_start_runs():
    """The first quick-start command's vaeeval call, run as the installed module."""
    lines = _quick_start_lines()
    assert len(lines) == 2 and "pytest" in lines[1]
    call = shlex.split(lines[0].split("&&")[-1])
    assert call[:3] == ["vaeeval", "elbo", call[2]] and call[2].startswith("sample_models/")
    done = subprocess.run([sys.executable, "-m", "vaeeval", *call[1:]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "iwae" in done.stdout and "bernoulli" in done.stdout
