"""vaeeval in CI and at scale: schemas, gates, streamed and resumed runs, shards, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from vaeeval import save_model
from vaeeval.cli import main
from vaeeval.output.schemas import schema, schema_names

ROOT = Path(__file__).resolve().parents[1]


def run(*args, code=0):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stderr, repr(result.exception))
    return result


def validate(document, name):
    jsonschema.Draft202012Validator(schema(name)).validate(document)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def second_model(tmp_path):
    """The fixture model with its output logits shifted by +1.5: clearly worse on the same data."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 6))
    with torch.no_grad():
        decoder[2].bias += 1.5
    return save_model(tmp_path / "other.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                      input_shape=[6], latent_dim=2, data={"domain": "binary"})


# ---------------------------------------------------------------- schemas


def test_every_schema_is_a_valid_schema_and_printable():
    for name in schema_names():
        jsonschema.Draft202012Validator.check_schema(schema(name))
        assert json.loads(run("schema", name).stdout) == schema(name)
    assert "vaeeval.elbo/1" in run("schema").stdout.split()
    assert run("schema", "nope", code=2).stderr.startswith("vaeeval: error: no schema 'nope'")


def test_every_output_validates(bernoulli_model, second_model, binary_data, tmp_path):
    model, data = bernoulli_model.path, binary_data
    validate(json.loads(run("elbo", model, data, "-k", "16", "--json").stdout), "vaeeval.elbo/1")
    full = json.loads(run("elbo", model, data, "-k", "16", "--json", "--convergence", "--diagnostics").stdout)
    validate(full, "vaeeval.elbo/1")
    validate(json.loads(run("compare", model, second_model.path, data, "-k", "16", "--json").stdout), "vaeeval.compare/1")
    validate(json.loads(run("inspect", model, "--json").stdout), "vaeeval.inspect/1")
    validate(json.loads(run("latents", model, data, "-k", "8", "--json").stdout), "vaeeval.latents/1")
    (tmp_path / "a.json").write_text(run("elbo", model, data, "-k", "16", "--json").stdout)
    validate(json.loads(run("check", tmp_path / "a.json", "--baseline", tmp_path / "a.json", "--json").stdout), "vaeeval.check/1")
    run("elbo", model, data, "-k", "16", "--output", tmp_path / "r.jsonl")
    for line in lines(tmp_path / "r.jsonl"):
        validate(line, "vaeeval.elbo-stream/1")
    # a density model (dequantized bits/dim) and a mixture prior (kl_stderr) validate too
    torch.manual_seed(0)
    mixture = save_model(
        tmp_path / "mix.safetensors", nn.Sequential(nn.Linear(6, 4)), nn.Sequential(nn.Linear(2, 6)),
        likelihood={"family": "gaussian", "sigma": 0.5}, input_shape=[6], latent_dim=2,
        prior={"family": "mixture_of_gaussians", "logits": torch.zeros(2), "means": torch.randn(2, 2), "log_vars": torch.zeros(2, 2)},
    )
    document = json.loads(run("elbo", mixture.path, data, "-k", "16", "--json", "--density").stdout)
    validate(document, "vaeeval.elbo/1")
    assert "kl_stderr" in document["points"][0] and "dequantized_bits_per_dim" in document["summary"]


# ---------------------------------------------------------------- gates


def test_fail_under_exits_1_below_the_threshold_and_0_at_or_above(bernoulli_model, binary_data):
    document = json.loads(run("elbo", bernoulli_model.path, binary_data, "-k", "32", "--json").stdout)
    iwae, elbo = document["summary"]["iwae"]["mean"], document["summary"]["elbo"]["mean"]
    base = ["elbo", bernoulli_model.path, binary_data, "-k", "32", "--json"]
    run(*base, "--fail-under", f"iwae={iwae - 1e-9}", "--fail-under", f"elbo={elbo - 1e-9}")
    failed = run(*base, "--fail-under", f"iwae={iwae - 1e-9}", "--fail-under", f"elbo={elbo + 1e-6}", code=1)
    assert json.loads(failed.stdout)["summary"]["iwae"]["mean"] == iwae  # the results are still printed
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("vaeeval: check failed: elbo mean")
    assert "iwae" not in failed.stderr
    assert run(*base, "--fail-under", "kl=3", code=2).stderr.startswith("vaeeval: error: --fail-under 'kl=3'")


def _json_run(tmp_path, name, *args):
    path = tmp_path / name
    path.write_text(run("elbo", *args, "--json").stdout)
    return path


def test_baseline_check_is_paired_and_statistical(bernoulli_model, second_model, binary_data, tmp_path):
    model, data = bernoulli_model.path, binary_data
    old = _json_run(tmp_path, "old.json", model, data, "-k", "64", "--seed", "0")
    noise = _json_run(tmp_path, "noise.json", model, data, "-k", "64", "--seed", "1")
    other = _json_run(tmp_path, "other.json", second_model.path, data, "-k", "64")
    documents = {p: json.loads(p.read_text()) for p in (old, noise, other)}
    # the same model with other noise: never fails on noise alone
    ok = run("check", noise, "--baseline", old, "--metric", "iwae", "--tolerance", "0.05")
    assert ok.stdout.startswith("iwae: ") and "paired over 23 points" in ok.stdout
    # the other model is worse or better; the check says which, beyond its paired standard error
    change = np.mean([b["iwae"] - a["iwae"] for a, b in zip(documents[old]["points"], documents[other]["points"], strict=False)])
    worse, better = (other, old) if change < 0 else (old, other)
    gap = abs(change)
    failed = run("check", worse, "--baseline", better, "--tolerance", f"{gap / 4}", code=1)
    assert failed.stderr.startswith("vaeeval: check failed: iwae:") and failed.stderr.count("\n") == 1
    run("check", worse, "--baseline", better, "--tolerance", f"{gap * 4}")
    verdict = json.loads(run("check", worse, "--baseline", better, "--tolerance", f"{gap * 4}", "--json").stdout)
    paired = np.array([a["iwae"] - b["iwae"] for a, b in zip(documents[worse]["points"], documents[better]["points"], strict=False)])
    assert verdict["difference"]["mean"] == pytest.approx(paired.mean())
    assert verdict["difference"]["stderr"] == pytest.approx(paired.std(ddof=1) / np.sqrt(paired.size))


def test_baseline_check_refuses_different_data(bernoulli_model, binary_data, tmp_path):
    old = _json_run(tmp_path, "old.json", bernoulli_model.path, binary_data, "-k", "16")
    fewer = _json_run(tmp_path, "fewer.json", bernoulli_model.path, binary_data, "-k", "16", "--limit", "10")
    refused = run("check", fewer, "--baseline", old, code=2)
    assert "cover different data" in refused.stderr and refused.stderr.count("\n") == 1


# ---------------------------------------------------------------- streamed, resumed


def _slow_run(tmp_path: Path) -> tuple[list[str], Path]:
    """A run long enough to interrupt: the categorical sample model at K = 2000, small batches."""
    output = tmp_path / "run.jsonl"
    args = [
        sys.executable, "-m", "vaeeval", "elbo", str(ROOT / "sample_models/digits_categorical.safetensors"),
        str(ROOT / "sample_models/digits_grey_test.npy"), "-k", "2000", "--limit", "120", "--batch-size", "8",
        "--output", str(output),
    ]
    return args, output


def _wait_for_points(output: Path, process: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_text().count("\n") > at_least:
            return
        time.sleep(0.05)
    raise AssertionError("the run finished or stalled before it could be interrupted")


def test_killed_run_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path):
    args, output = _slow_run(tmp_path)
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_points(output, process, 20)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = output.read_text()
    assert '"kind": "summary"' not in killed
    resumed = subprocess.run([*args, "--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    fresh_output = tmp_path / "fresh.jsonl"
    fresh_args = [*args[:-1], str(fresh_output), "--json"]
    fresh = subprocess.run(fresh_args, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    resumed_doc, fresh_doc = json.loads(resumed.stdout), json.loads(fresh.stdout)
    assert resumed_doc["points"] == fresh_doc["points"] and resumed_doc["summary"] == fresh_doc["summary"]
    by_index = lambda records: sorted((r for r in records if "kind" not in r), key=lambda r: r["index"])
    assert by_index(lines(output)) == by_index(lines(fresh_output))
    assert lines(output)[-1] == lines(fresh_output)[-1]  # the summary line


def test_ctrl_c_prints_the_summary_so_far_and_resume_finishes(tmp_path):
    args, output = _slow_run(tmp_path)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_points(output, process, 12)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Summary over points" in stdout and "interrupted after" in stderr and "--resume continues" in stderr
    done = sum(1 for r in lines(output) if "kind" not in r)
    assert f"interrupted after {done} of 120 points" in stderr
    finished = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and lines(output)[-1]["kind"] == "summary"
    assert sorted(r["index"] for r in lines(output) if "kind" not in r) == list(range(120))


def test_a_half_written_last_line_is_repaired_on_resume(bernoulli_model, binary_data, tmp_path):
    output = tmp_path / "r.jsonl"
    run("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output)
    complete = output.read_text()
    body = complete.splitlines(keepends=True)
    output.write_text("".join(body[:6]) + body[6][:25])  # a crash mid-line, no summary
    run("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output, "--resume")
    assert output.read_text() == complete


def test_resume_refuses_another_run(bernoulli_model, binary_data, tmp_path):
    output = tmp_path / "r.jsonl"
    run("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output)
    refused = run("elbo", bernoulli_model.path, binary_data, "-k", "16", "--seed", "3", "--output", output, "--resume", code=2)
    assert "holds another run: the samples or seed differ" in refused.stderr


# ---------------------------------------------------------------- scale-out


def test_shards_merge_into_the_single_run(bernoulli_model, binary_data, tmp_path):
    base = ["elbo", bernoulli_model.path, binary_data, "-k", "40"]
    single = tmp_path / "single.jsonl"
    single_doc = json.loads(run(*base, "--json", "--output", single).stdout)
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        run(*base, "--shard", f"{i}/3", "--output", part)
    assert sum(1 for p in parts for r in lines(p) if "kind" not in r) == 23
    merged_doc = json.loads(run("merge", *parts[::-1], "--json").stdout)
    assert merged_doc == single_doc
    run("merge", *parts, "--output", tmp_path / "merged.jsonl")
    assert (tmp_path / "merged.jsonl").read_text() == single.read_text()
    missing = run("merge", parts[0], parts[2], code=2)
    assert "missing" in missing.stderr and missing.stderr.count("\n") == 1
    assert "more than one file" in run("merge", parts[0], parts[0], parts[1], parts[2], code=2).stderr


def test_torchrun_two_processes_give_the_single_process_numbers(bernoulli_model, binary_data, tmp_path):
    args = [str(bernoulli_model.path), str(binary_data), "-k", "48", "--json", "--convergence", "--diagnostics"]
    environment = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    distributed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vaeeval", "elbo",
         *args, "--output", str(tmp_path / "d.jsonl")],
        capture_output=True, text=True, timeout=300, env=environment,
    )
    assert distributed.returncode == 0, distributed.stderr
    single = run("elbo", *args)
    distributed_doc, single_doc = json.loads(distributed.stdout), json.loads(single.stdout)
    for key in ("points", "summary", "convergence", "latents"):
        assert distributed_doc[key] == single_doc[key], key
    assert [r["index"] for r in lines(tmp_path / "d.jsonl") if "kind" not in r] == list(range(23))
