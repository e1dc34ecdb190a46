"""Every number of every output is the same bits however the run was split or where it ran.

One matrix: each command's whole JSON document (per-point estimates, standard errors,
ESS, k-hat, convergence, latent health, AIS and compare statistics) from a plain run is
compared with the same command's under another batch size, memory budget or thread
count, under every ATen vector ISA this CPU has (``ATEN_CPU_CAPABILITY``), with NumPy's
AVX-512 code switched off, split across torchrun processes, and split into shards then
merged, or killed and resumed.
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
    "5 threads": ({"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}, []),  # more than the cores, an odd split
    "NumPy without AVX-512": ({"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512_SKX"}, []),
    **{f"ATen {isa}": ({"ATEN_CPU_CAPABILITY": isa}, []) for isa in _capabilities()},
}


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _run(args: list, env: dict[str, str] | None = None, launcher: list[str] | None = None) -> str:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, *(launcher or []), "-m", "vaeeval", *map(str, args)], capture_output=True,
                          text=True, env=environment, timeout=300)
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
def test_torchrun_processes_give_the_same_bits(plain, workload, tmp_path):
    output = tmp_path / "run.jsonl"
    assert _numbers(_run([*WORKLOADS[workload], "--json", "--output", output], launcher=TORCHRUN)) == plain[workload]
    assert sorted(json.loads(line)["index"] for line in output.read_text().splitlines()[1:-1]) == list(
        range(plain[workload]["summary"]["n"])
    )


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
    from vaeeval.results.numbers import mean_and_stderr

    values = np.random.default_rng(3).standard_normal(1001) * 1e3 + 1e6
    assert mean_and_stderr(values) == mean_and_stderr(values[::-1]) == mean_and_stderr(np.roll(values, 17))


_EVERY_FAMILY = """
import hashlib, json, sys
import numpy as np, torch
from vaeeval import evaluate, load_model
from vaeeval.estimators.annealing.ais import AISEvaluator, AISOptions
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.format.likelihoods import likelihood_from_spec

found = {}
for name in sys.argv[2:]:
    model, data = load_model(f"{sys.argv[1]}/{name}.safetensors"), np.load(f"{sys.argv[1]}/{name}.npy")
    for options in ({}, {"density": True}):
        result = evaluate(model, data, samples=130, seed=3, batch_size=5, **options)
        found[f"{name} {options}"] = [getattr(result.points, k).tolist() for k in ("elbo", "iwae", "ess", "khat")]
    ais = AISEvaluator(model, data[:6], AISOptions(steps=6, leapfrog=2, chains=3), EvaluationOptions(samples=8)).evaluate()
    found[f"{name} ais"] = [ais.points.ais.tolist(), ais.points.acceptance.tolist()]
rng = np.random.default_rng(0)
x = torch.from_numpy(rng.poisson(3.0, (4, 50)).astype(np.float64))
for family in ("poisson", "negative_binomial", "zinb"):
    blocks = 1 if family == "poisson" else 2 if family == "negative_binomial" else 3
    spec, tensors = ({"family": family}, {}) if family == "poisson" else ({"family": family}, {})
    likelihood = likelihood_from_spec(spec, tensors, (50,))
    params = torch.from_numpy(rng.normal(size=(4, likelihood.params_per_dim, 50)))
    found[family] = likelihood.log_prob(params, x).tolist()
print(hashlib.sha256(json.dumps(found).encode()).hexdigest(), json.dumps(found))
"""


def test_every_family_layer_and_path_is_the_same_bits_under_every_isa(tmp_path):
    """Each family (densities and bins), each activation, layer norm and softmax, a convolutional decoder off the linear
    shortcut, AIS through them, and the count families: the same bits under each ATen ISA."""
    from conftest import FAMILIES, family_data
    from torch import nn

    from vaeeval import save_model

    torch.manual_seed(0)
    dims, names = 16, []
    for likelihood, outputs, kind in FAMILIES:
        encoder = nn.Sequential(nn.Linear(dims, 16), nn.ELU(), nn.LayerNorm(16), nn.Linear(16, 16), nn.Softmax(dim=1), nn.Linear(16, 16),
                                nn.GELU(), nn.Linear(16, 6))
        decoder = nn.Sequential(
            nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 16), nn.Sigmoid(),
            nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, outputs * dims),
        )
        names.append(f"{likelihood['family']}{outputs}")
        save_model(tmp_path / f"{names[-1]}.safetensors", encoder, decoder, likelihood=likelihood, input_shape=[dims],
                   latent_dim=3)
        np.save(tmp_path / f"{names[-1]}.npy", family_data(kind, 11, dims))
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4))
    decoder = nn.Sequential(nn.Linear(2, 4 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (4, 4, 4)), nn.ConvTranspose2d(4, 1, 4, 2, 1))
    save_model(tmp_path / "conv.safetensors", encoder, decoder, likelihood={"family": "bernoulli"}, input_shape=[1, 8, 8],
               latent_dim=2)
    np.save(tmp_path / "conv.npy", family_data("binary", 11, 64).reshape(11, 1, 8, 8))
    names.append("conv")
    script = tmp_path / "every_family.py"
    script.write_text(_EVERY_FAMILY)
    digests = {}
    for isa in _capabilities():
        done = subprocess.run([sys.executable, str(script), str(tmp_path), *names], capture_output=True, text=True,
                              env={**os.environ, "ATEN_CPU_CAPABILITY": isa}, timeout=300)
        assert done.returncode == 0, done.stderr
        digests[isa] = done.stdout.split(" ", 1)
    first, *others = digests.values()
    for isa, (digest, found) in zip(list(digests)[1:], others, strict=True):
        if digest != first[0]:
            expected, differs = json.loads(first[1]), json.loads(found)
            assert differs == expected, f"{isa}: " + ", ".join(k for k in expected if expected[k] != differs[k])


_ARCH = """
from torch import nn


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 6))
        self.dec = nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 16))

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.dec(z)
"""


def test_an_arch_model_scored_with_a_likelihood_is_the_same_bits_under_every_isa(tmp_path):
    """--arch whose decode gives the likelihood's parameters: elbo is fixed (vaeeval's own part, and the
    user's forward pass through torch's tanh); AIS, which differentiates the user's network with torch's
    kernels, is fixed once the model is converted to format 1."""
    from safetensors.torch import save_file

    (tmp_path / "tiny_vae.py").write_text(_ARCH)
    sys.path.insert(0, str(tmp_path))
    try:
        from tiny_vae import VAE
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    save_file(VAE().state_dict(), tmp_path / "w.safetensors")
    np.save(tmp_path / "x.npy", (np.random.default_rng(0).random((9, 16)) < 0.4).astype(np.float32))
    arch = [tmp_path / "w.safetensors", tmp_path / "x.npy", "--arch", f"{tmp_path / 'tiny_vae.py'}:VAE", "--likelihood",
            "bernoulli", "--json"]
    converted = tmp_path / "converted.safetensors"
    _run(["convert", arch[0], *arch[2:6], "--input-shape", "16", "-o", converted])
    documents = {
        isa: [_numbers(_run(["elbo", *arch, "-k", "80", "--all", "--diagnostics"], {"ATEN_CPU_CAPABILITY": isa})),
              _numbers(_run(["ais", converted, tmp_path / "x.npy", "--steps", "8", "--leapfrog", "3", "--chains", "3",
                             "-k", "16", "--all", "--json"], {"ATEN_CPU_CAPABILITY": isa}))]
        for isa in _capabilities()
    }
    first, *others = documents.values()
    assert all(other == first for other in others)
