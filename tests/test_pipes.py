"""A closed stdout (``vaeeval elbo ... | head``) ends quietly with exit code 141, never 1 (a failed check).

Each command runs as a real process whose stdout is a pipe closed before it writes anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "digits_gaussian.safetensors"
DATA = ROOT / "sample_models" / "digits_grey_test.npy"


def _run_with_closed_stdout(*args: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "vaeeval", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # the reader is gone before the command has even imported torch
    error = process.stderr.read().decode()
    process.stderr.close()
    return process.wait(timeout=120), error


@pytest.mark.parametrize(
    "args",
    [
        ["elbo", str(MODEL), str(DATA), "--limit", "16", "-k", "4"],  # a rich table
        ["elbo", str(MODEL), str(DATA), "--limit", "16", "-k", "4", "--json"],  # click.echo
        ["inspect", str(MODEL)],
    ],
    ids=["table", "json", "inspect"],
)
def test_closed_stdout_exits_141_quietly(args):
    code, error = _run_with_closed_stdout(*args)
    assert (code, error) == (141, "")


def test_open_stdout_still_exits_0():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "vaeeval", "inspect", str(MODEL)], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == b"" and b"gaussian" in done.stdout.lower()


def test_bad_input_with_closed_stdout_is_still_exit_2(tmp_path):
    missing = tmp_path / "missing.safetensors"
    code, error = _run_with_closed_stdout("inspect", str(missing))
    assert code == 2 and error == f"vaeeval: error: {missing}: no such file\n"
