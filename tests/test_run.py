"""vaeeval.runs.run: long runs killed and resumed, interrupted with Ctrl-C; the torchrun world (its numbers: test_determinism)."""

from __future__ import annotations

import json
import os
import signal
import socket
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


# ---------------------------------------------------------------- torchrun: a peer late, never there, or slow

_RUN = [str(ROOT / "sample_models/digits_bernoulli.safetensors"), str(ROOT / "sample_models/digits_binary_test.npy"),
        "-k", "8", "--limit", "6", "--json"]
# rank 1, its share's evaluation held back: the gather must wait for it past --dist-timeout
_SLOW_RANK = ("import sys, time; from vaeeval.estimators.importance.evaluate import Evaluator; parts = Evaluator.parts; "
              "Evaluator.parts = lambda *a, **k: (time.sleep(13), parts(*a, **k))[1]; "
              "from vaeeval.cli import main; sys.argv[0] = 'vaeeval'; main()")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, *extra: str, code: list[str] | None = None) -> subprocess.Popen:
    environment = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "PYTHONPATH": str(ROOT)}
    command = code or ["-m", "vaeeval"]
    return subprocess.Popen([sys.executable, *command, "elbo", *_RUN, *extra], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(("rank", "phrase"), [
    (0, "torchrun: 1 of 2 processes joined within 2 s (127.0.0.1:{port}); start every rank"),
    (1, "torchrun: rank 1 found no rendezvous at 127.0.0.1:{port} within 2 s (rank 0 hosts it)"),
])
def test_a_peer_that_never_comes_ends_the_run_in_one_line(rank, phrase):
    """(L) a process whose peer never started waited forever (torch's 30 minutes, for rank 0)."""
    port = _free_port()
    process = _rank(rank, port, "--dist-timeout", "2")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith("vaeeval: error: " + phrase.format(port=port)) and "--dist-timeout" in stderr, stderr


def test_a_slow_peer_is_waited_for_past_the_rendezvous_timeout():
    """--dist-timeout bounds the start only: a rank done 13 s after the other is gathered, not timed out at 10 s
    (10 s, not less, for the two processes' start on a busy machine)."""
    port = _free_port()
    first = _rank(0, port, "--dist-timeout", "10")
    slow = _rank(1, port, "--dist-timeout", "10", code=["-c", _SLOW_RANK])
    stdout, stderr = first.communicate(timeout=120)
    assert slow.wait(timeout=60) == 0 and first.returncode == 0, stderr + slow.stderr.read()
    one = json.loads(cli("elbo", *_RUN).stdout)
    both = json.loads(stdout)
    assert both["summary"] == one["summary"] and both["points"] == one["points"]


@pytest.mark.parametrize(("value", "phrase"), [("0", "'0' is not > 0"), ("-1", "'-1' is not > 0"),
                                               ("nan", "'nan' is not a finite number"), ("abc", "'abc' is not a number")])
def test_a_dist_timeout_that_is_no_time_is_one_line(value, phrase):
    result = cli("elbo", *_RUN, "--dist-timeout", value, code=2)
    assert result.stderr.count("\n") == 1 and f"Invalid value for '--dist-timeout': {phrase}" in result.stderr, result.stderr


def test_a_peer_that_dies_before_the_gather_is_one_line():
    """Rank 1 killed during its share: rank 0 ends with one line, not gloo's traceback."""
    port = _free_port()
    first = _rank(0, port, "--dist-timeout", "20")
    dying = _rank(1, port, "--dist-timeout", "20", code=["-c", _SLOW_RANK.replace("time.sleep(13)", "os._exit(9)")
                                                             .replace("import sys,", "import os, sys,")])
    stdout, stderr = first.communicate(timeout=120)
    assert dying.wait(timeout=60) == 9
    assert first.returncode == 2 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith("vaeeval: error: torchrun: a process left before the results were gathered"), stderr
