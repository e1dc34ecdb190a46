"""Every number of every output is the same bits however the run was split or where it ran.

One matrix: each command's whole JSON document (per-point estimates, standard errors,
ESS, k-hat, convergence, latent health, AIS and compare statistics) from a plain run is
compared with the same command's under another batch size, memory budget or thread
count, under every ATen vector ISA this CPU has (``ATEN_CPU_CAPABILITY``), with NumPy's
AVX-512 code switched off, and split into shards then merged, or killed and resumed.
Each run is a fresh process, so the environment variables take effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = Path(__file__).resolve().parent.parent / "sample_models"
GREY, BINARY = MODELS / "digits_grey_test.npy", MODELS / "digits_binary_test.npy"

WORKLOADS = {
    "elbo": ["elbo", MODELS / "digits_gaussian.safetensors", GREY, "-k", "70", "--limit", "24", "--diagnostics",
             "--convergence", "--all"],
    "ais": ["ais", MODELS / "digits_bernoulli.safetensors", BINARY, "--steps", "12", "--leapfrog", "3", "--chains", "4",
            "-k", "40", "--limit", "9", "--all"],
    "compare": ["compare", MODELS / "digits_gaussian.safetensors", MODELS / "digits_categorical.safetensors", GREY,
                "-k", "40", "--limit", "15"],
}
STREAMED = ("elbo", "ais")  # the commands that write results files (--output, --shard, --resume)


def _capabilities() -> list[str]:
    """ATen's vector ISAs up to the one this CPU has."""
    found = torch.backends.cpu.get_cpu_capability().lower()
    order = ["default", "avx2", "avx512"]
    return order[: order.index(found) + 1] if found in order else ["default", found]


def _numpy_has_avx512() -> bool:
    from numpy._core._multiarray_umath import __cpu_features__

    return bool(__cpu_features__.get("AVX512F"))


VARIANTS: dict[str, tuple[dict[str, str], list[str]]] = {
    "batch size 1": ({}, ["--batch-size", "1"]),
    "batch size 7": ({}, ["--batch-size", "7"]),
    "memory 1M": ({}, ["--max-memory", "1M"]),
    "1 thread": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, []),
    "NumPy without AVX-512": ({"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512_SKX"}, []),
    **{f"ATen {isa}": ({"ATEN_CPU_CAPABILITY": isa}, []) for isa in _capabilities()},
}


def _run(args: list, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    environment = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, "-m", "vaeeval", *map(str, args)], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _numbers(stdout: str) -> dict:
    """The document without its settings (which name the batch size and chunk size it ran with)."""
    document = json.loads(stdout)
    document.pop("settings", None)
    for model in document.get("models", []):
        model.pop("settings", None)
    return document


@pytest.fixture(scope="module")
def plain() -> dict[str, dict]:
    return {name: _numbers(_run([*args, "--json"])) for name, args in WORKLOADS.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_every_number_is_the_same_bits(plain, workload, variant):
    env, extra = VARIANTS[variant]
    if variant.startswith("NumPy") and not _numpy_has_avx512():
        pytest.skip("NumPy uses no AVX-512 code on this CPU")
    if variant.startswith("memory") and workload == "ais":
        extra = []  # AIS plans its batch from the budget by itself; the batch sizes above cover it
    assert _numbers(_run([*WORKLOADS[workload], *extra, "--json"], env)) == plain[workload]


@pytest.mark.parametrize("workload", STREAMED)
def test_shards_merged_and_a_resumed_run_are_the_same_bits(workload, tmp_path):
    args = [a for a in WORKLOADS[workload] if a not in ("--diagnostics", "--convergence")]  # they need one process
    whole = _numbers(_run([*args, "--json", "--output", tmp_path / "whole.jsonl"]))
    parts = [tmp_path / f"part{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        _run([*args, "--shard", f"{i}/3", "--output", part, "--batch-size", str(2 + i)])
    assert _numbers(_run(["merge", *parts[::-1], "--json"])) == whole

    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:5]))  # the header and the first points, as a killed run leaves them
    assert _numbers(_run([*args, "--json", "--output", cut, "--resume", "--batch-size", "4"])) == whole
    assert cut.read_text() == (tmp_path / "whole.jsonl").read_text().replace(str(tmp_path / "whole.jsonl"), str(cut))


def test_statistics_do_not_depend_on_how_the_points_are_grouped():
    from vaeeval.results import mean_and_stderr

    values = np.random.default_rng(3).standard_normal(1001) * 1e3 + 1e6
    assert mean_and_stderr(values) == mean_and_stderr(values[::-1]) == mean_and_stderr(np.roll(values, 17))
