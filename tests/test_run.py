"""vaeeval.runs.run: long runs killed and resumed, interrupted with Ctrl-C; the torchrun world (its numbers: test_determinism)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, jsonl

from vaeeval.runs.run import distributed_world, local_processes

ROOT = Path(__file__).resolve().parents[1]


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
    assert by_index(jsonl(output)) == by_index(jsonl(fresh_output))
    assert jsonl(output)[-1] == jsonl(fresh_output)[-1]  # the summary line


def test_ctrl_c_prints_the_summary_so_far_and_resume_finishes(tmp_path):
    args, output = _slow_run(tmp_path)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_points(output, process, 12)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Summary over points" in stdout and "interrupted after" in stderr and "--resume continues" in stderr
    done = sum(1 for r in jsonl(output) if "kind" not in r)
    assert f"interrupted after {done} of 120 points" in stderr
    finished = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and jsonl(output)[-1]["kind"] == "summary"
    assert sorted(r["index"] for r in jsonl(output) if "kind" not in r) == list(range(120))


def test_resume_refuses_another_run(bernoulli_model, binary_data, tmp_path):
    output = tmp_path / "r.jsonl"
    cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output)
    refused = cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--seed", "3", "--output", output, "--resume", code=2)
    assert "holds another run: the samples or seed differ" in refused.stderr


def test_resuming_a_finished_run_computes_nothing_and_gives_its_numbers(bernoulli_model, binary_data, tmp_path):
    output = tmp_path / "r.jsonl"
    first = cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output, "--json").stdout
    written = output.read_text()
    again = cli("elbo", bernoulli_model.path, binary_data, "-k", "16", "--output", output, "--resume", "--json").stdout
    assert json.loads(again)["points"] == json.loads(first)["points"] and output.read_text() == written


# ---------------------------------------------------------------- torchrun

RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # torchrun sets both for every process


@pytest.mark.parametrize(
    ("environment", "world", "local"),
    [({}, None, 1), ({"WORLD_SIZE": "1", "RANK": "0"}, None, 1), ({"WORLD_SIZE": "4", "RANK": "3", **RENDEZVOUS}, (3, 4), 4),
     ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_WORLD_SIZE": "2", **RENDEZVOUS}, (1, 4), 2)],
)
def test_the_torchrun_world_is_read_from_its_environment(monkeypatch, environment, world, local):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", *RENDEZVOUS):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert distributed_world() == world and local_processes() == local
