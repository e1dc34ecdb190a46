"""Snapshot every command's output on the sample models, to prove a refactoring changes no byte.

    python benchmarks/snapshot.py OUT_DIR          # before the change
    python benchmarks/snapshot.py OUT_DIR2         # after it
    diff -r OUT_DIR OUT_DIR2                       # nothing may differ

Each command's stdout, stderr and exit code go to one file per command; the
results files the commands write (``--output``, ``--shard``, ``merge --output``)
are copied beside them. Run from the repository root.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MODELS = "sample_models"
BERNOULLI = f"{MODELS}/digits_bernoulli.safetensors"
GAUSSIAN = f"{MODELS}/digits_gaussian.safetensors"
CATEGORICAL = f"{MODELS}/digits_categorical.safetensors"
CONTINUOUS_BERNOULLI = f"{MODELS}/digits_continuous_bernoulli.safetensors"
BINARY = f"{MODELS}/digits_binary_test.npy"
GREY = f"{MODELS}/digits_grey_test.npy"

COMMANDS = {
    "elbo_bernoulli": f"elbo {BERNOULLI} {BINARY}",
    "elbo_bernoulli_json": f"elbo {BERNOULLI} {BINARY} --json --convergence --diagnostics",
    "elbo_gaussian_diag": f"elbo {GAUSSIAN} {GREY} --diagnostics --convergence --all -k 300",
    "elbo_gaussian_density_json": f"elbo {GAUSSIAN} {GREY} --density --json -k 200",
    "elbo_cb_json": f"elbo {CONTINUOUS_BERNOULLI} {GREY} --json -k 100 --seed 7 --limit 50",
    "elbo_categorical": f"elbo {CATEGORICAL} {GREY} -k 100 --batch-size 7",
    "elbo_gate": f"elbo {BERNOULLI} {BINARY} -k 50 --fail-under iwae=-10",
    "elbo_output": f"elbo {BERNOULLI} {BINARY} -k 64 --output {{tmp}}/run.jsonl",
    "elbo_shard0": f"elbo {BERNOULLI} {BINARY} -k 64 --shard 0/2 --output {{tmp}}/part0.jsonl",
    "elbo_shard1": f"elbo {BERNOULLI} {BINARY} -k 64 --shard 1/2 --output {{tmp}}/part1.jsonl",
    "merge_json": "merge {tmp}/part0.jsonl {tmp}/part1.jsonl --json",
    "merge_output": "merge {tmp}/part0.jsonl {tmp}/part1.jsonl --output {tmp}/merged.jsonl",
    "check": "check {tmp}/run.jsonl --baseline {tmp}/merged.jsonl",
    "check_json": "check {tmp}/run.jsonl --baseline {tmp}/merged.jsonl --json --tolerance 0.1",
    "compare": f"compare {GAUSSIAN} {CONTINUOUS_BERNOULLI} {CATEGORICAL} {GREY} -k 100",
    "compare_json": f"compare {GAUSSIAN} {CATEGORICAL} {GREY} -k 50 --json",
    "compare_density": f"compare {GAUSSIAN} {CONTINUOUS_BERNOULLI} {CATEGORICAL} {GREY} -k 50 --density",
    "latents": f"latents {GAUSSIAN} {GREY} -k 20",
    "latents_json": f"latents {BERNOULLI} {BINARY} -k 20 --json",
    "inspect": f"inspect {GAUSSIAN}",
    "inspect_json": f"inspect {CATEGORICAL} --json",
    "calibrate": f"calibrate {GAUSSIAN} {GREY} --density -k 20 --limit 100 -o {{tmp}}/calibrated.safetensors",
    "calibrate_json": f"calibrate {GAUSSIAN} {GREY} --density --per-dimension -k 8 --limit 40 --json -o {{tmp}}/per_dim.safetensors",
    "inspect_calibrated": "inspect {tmp}/calibrated.safetensors",
    "elbo_calibrated": f"elbo {{tmp}}/calibrated.safetensors {GREY} --density -k 50 --limit 100",
    "elbo_gaussian_explain": f"elbo {GAUSSIAN} {GREY} --explain -k 50 --limit 50",
    "elbo_cb_explain_json": f"elbo {CONTINUOUS_BERNOULLI} {GREY} --density --explain --json -k 20 --limit 10",
    "elbo_per_dim_explain": f"elbo {{tmp}}/per_dim.safetensors {GREY} --density --explain -k 20 --limit 40",
    "schema_list": "schema",
    "error_model": f"elbo {BINARY} {BINARY}",
    "error_data": f"elbo {BERNOULLI} {GREY}",
    "error_option": f"elbo {BERNOULLI} {BINARY} --device tpu",
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vaeeval = [sys.executable, "-m", "vaeeval"]
    names = subprocess.run([*vaeeval, "schema"], capture_output=True, text=True, check=True).stdout.split()
    commands = dict(COMMANDS, **{f"schema_{n.replace('/', '_')}": f"schema {n}" for n in names})
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in commands.items():
            argv = shlex.split(command.replace("{tmp}", tmp))
            done = subprocess.run([*vaeeval, *argv], capture_output=True, text=True)
            text = f"$ vaeeval {command}\nexit {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"
            (out / f"{name}.txt").write_text(text.replace(tmp, "{tmp}"))  # paths the output names (calibrate's --output)
        for written in Path(tmp).iterdir():
            if written.suffix == ".safetensors":  # a model file: compared byte for byte
                shutil.copyfile(written, out / written.name)
                continue
            text = written.read_text().replace(tmp, "{tmp}")
            (out / written.name).write_text(text)
    shutil.rmtree(out / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
