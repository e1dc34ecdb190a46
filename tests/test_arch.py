"""--arch and convert: a user's own VAE class, read through the protocol, and its format-1 twin."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from vaeeval import VaeevalError, evaluate, load_data, load_model
from vaeeval.analysis.convert import AGREEMENT
from vaeeval.cli import main
from vaeeval.user.arch import ArchOptions, arch_model, load_architecture

# The VAE of pytorch/examples (vae/main.py), smaller: two encoder heads, a sigmoid output.
EXAMPLES_VAE = '''
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class VAE(nn.Module):
    def __init__(self, dims=784, hidden=400, latent_dim=20):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc21 = nn.Linear(hidden, latent_dim)
        self.fc22 = nn.Linear(hidden, latent_dim)
        self.fc3 = nn.Linear(latent_dim, hidden)
        self.fc4 = nn.Linear(hidden, dims)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3))


def make_vae(**kwargs):
    return VAE(**kwargs)


class Exploding(VAE):
    def __init__(self, **kwargs):
        raise ValueError("no GPU found")


class WrongShape(VAE):
    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)[:, :3]


class Overshoot(VAE):
    def decode(self, z):
        return 1.5 * torch.sigmoid(self.fc4(F.relu(self.fc3(z))))


class Untraceable(VAE):
    def decode(self, z):
        p = torch.sigmoid(self.fc4(F.relu(self.fc3(z))))
        if p.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return p
        return p


class Residual(VAE):
    def decode(self, z):
        h3 = F.relu(self.fc3(z))
        return torch.sigmoid(self.fc4(h3 + h3))


class GaussianVAE(VAE):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log_sigma = nn.Parameter(torch.tensor(-0.7))

    def decode(self, z):
        return self.fc4(F.relu(self.fc3(z)))


class NormalEncoder(VAE):
    def encode(self, x):
        mean, log_var = super().encode(x)
        return torch.distributions.Normal(mean, (0.5 * log_var).exp())


class SigmoidModule(VAE):
    """pythae's decoders end in an nn.Sigmoid module, and reshape by np.prod of a stored shape."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.squash = nn.Sigmoid()
        self.shape = (kwargs.get("dims", 784),)

    def encode(self, x):
        return super().encode(x.reshape(-1, np.prod(self.shape)))

    def decode(self, z):
        return self.squash(self.fc4(F.relu(self.fc3(z))))


class MixturePrior(VAE):
    """A learned mixture prior, as a torch distribution."""

    def __init__(self, components=3, **kwargs):
        super().__init__(**kwargs)
        latent = kwargs.get("latent_dim", 20)
        self.prior_logits = nn.Parameter(torch.linspace(-0.5, 0.5, components))
        self.prior_means = nn.Parameter(torch.linspace(-1, 1, components * latent).reshape(components, latent))
        self.prior_log_scales = nn.Parameter(torch.full((components, latent), -0.3))

    def prior(self):
        D = torch.distributions
        components = D.Independent(D.Normal(self.prior_means, self.prior_log_scales.exp()), 1)
        return D.MixtureSameFamily(D.Categorical(logits=self.prior_logits), components)


class VampPrior(VAE):
    """p(z) = the mean of q(z|u_k) over learned pseudo-inputs u_k (Tomczak & Welling 2018), as pythae builds it."""

    def __init__(self, components=5, **kwargs):
        super().__init__(**kwargs)
        self.pseudo_inputs = nn.Sequential(nn.Linear(components, kwargs.get("dims", 784), bias=False), nn.Hardtanh(0.0, 1.0))
        self.register_buffer("idle_input", torch.eye(components), persistent=False)
        self.unused_head = nn.Linear(3, 3)

    def prior(self):
        D = torch.distributions
        mean, log_var = self.encode(self.pseudo_inputs(self.idle_input))
        components = D.Independent(D.Normal(mean, (0.5 * log_var).exp()), 1)
        return D.MixtureSameFamily(D.Categorical(logits=torch.zeros(mean.shape[0])), components)


class BernoulliDistribution(VAE):
    def decode(self, z):
        return torch.distributions.Bernoulli(logits=self.fc4(F.relu(self.fc3(z))))


class FullCovariance(VAE):
    def encode(self, x):
        mean, log_var = super().encode(x)
        return torch.distributions.MultivariateNormal(mean, scale_tril=torch.diag_embed((0.5 * log_var).exp()))
'''

# A convolutional VAE over [1, 8, 8] images: a chunked encoder output, a view in the decoder, logits.
CONV_VAE = '''
import torch
from torch import nn


class ConvVAE(nn.Module):
    def __init__(self, latent_dim=3):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2 * latent_dim))
        self.fc = nn.Linear(latent_dim, 8 * 2 * 2)
        self.dec = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.SiLU(),
                                 nn.ConvTranspose2d(4, 1, 4, stride=2, padding=1))

    def encode(self, x):
        mean, log_var = self.enc(x).chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z):
        return self.dec(torch.tanh(self.fc(z)).view(-1, 8, 2, 2))
'''

DIMS, HIDDEN, LATENT = 64, 32, 4
ARGS = json.dumps({"dims": DIMS, "hidden": HIDDEN, "latent_dim": LATENT})


@pytest.fixture
def examples(tmp_path):
    """vae.py, its state dict as safetensors, and binary data."""
    (tmp_path / "vae.py").write_text(EXAMPLES_VAE)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        vae_module = importlib.import_module("vae")
        torch.manual_seed(0)
        model = vae_module.VAE(DIMS, HIDDEN, LATENT)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vae", None)
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    np.save(tmp_path / "data.npy", (np.random.default_rng(0).random((20, DIMS)) < 0.3).astype(np.float32))
    return tmp_path


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.stderr + repr(result.exception)
    return result


def _arch_args(folder: Path, name: str = "VAE", *extra: str) -> list[str]:
    return ["--arch", f"{folder / 'vae.py'}:{name}", "--arch-args", ARGS, "--likelihood", "bernoulli",
            "--decoder-output", "probs", *extra]


def test_examples_vae_via_arch_gives_the_numbers_of_its_format1_conversion(examples):
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    via_arch = json.loads(run("elbo", weights, data, "-k", "200", "--json", *_arch_args(examples)).stdout)
    out = run("convert", weights, *_arch_args(examples), "--data", data, "-o", examples / "model.safetensors").stdout
    assert out.startswith(f"wrote {examples / 'model.safetensors'}: format 1")
    converted = load_model(examples / "model.safetensors")
    assert [layer.type for layer in converted.layers] == ["linear", "relu", "linear", "linear", "relu", "linear"]
    via_format1 = json.loads(run("elbo", examples / "model.safetensors", data, "-k", "200", "--json").stdout)
    for a, b in zip(via_arch["points"], via_format1["points"], strict=False):
        for name in ("elbo", "recon", "kl", "iwae"):
            assert a[name] == pytest.approx(b[name], rel=AGREEMENT, abs=AGREEMENT)
    assert via_arch["summary"]["measure"] == "probability"


def test_probabilities_are_read_as_exact_logits_when_decode_traces(examples):
    options = ArchOptions(f"{examples / 'vae.py'}:VAE", {"family": "bernoulli"}, json.loads(ARGS), "probs")
    traced = arch_model(examples / "weights.safetensors", options, (DIMS,))
    fallback = arch_model(examples / "weights.safetensors", replace(options, spec=f"{examples / 'vae.py'}:Untraceable"), (DIMS,))
    assert "before its final sigmoid" in traced.description and "clamped" in fallback.description
    z = torch.randn(70, LATENT)
    with torch.inference_mode():
        module = traced.decoder.module
        logits = module.fc4(torch.relu(module.fc3(z)))
        torch.testing.assert_close(traced.decode(z)[:, 0], logits)
        # the fallback goes through float32 probabilities: close, not exact
        torch.testing.assert_close(fallback.decode(z)[:, 0], logits, rtol=1e-3, atol=1e-3)


def test_factory_and_package_module_forms(examples, monkeypatch):
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    monkeypatch.syspath_prepend(str(examples))
    by_file = json.loads(run("elbo", weights, data, "-k", "16", "--json", *_arch_args(examples)).stdout)
    by_module = json.loads(run("elbo", weights, data, "-k", "16", "--json", "--arch", "vae:make_vae", "--arch-args", ARGS,
                               "--likelihood", "bernoulli", "--decoder-output", "probs").stdout)
    assert by_file["points"] == by_module["points"]


def test_entry_point_names_an_architecture(examples, monkeypatch):
    dist = examples / "demo_vaes-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-vaes\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vaeeval.architectures]\nexamples-vae = vae:make_vae\n")
    monkeypatch.syspath_prepend(str(examples))
    out = run("elbo", examples / "weights.safetensors", examples / "data.npy", "-k", "8", "--json", "--arch", "examples-vae",
              "--arch-args", ARGS, "--likelihood", "bernoulli", "--decoder-output", "probs")
    assert json.loads(out.stdout)["data"]["n"] == 20
    unknown = run("elbo", examples / "weights.safetensors", examples / "data.npy", "--arch", "nope", "--likelihood", "bernoulli", ok=False)
    assert unknown.exit_code == 2 and "examples-vae" in unknown.stderr


def test_conv_vae_via_arch_and_converted(tmp_path):
    (tmp_path / "conv.py").write_text(CONV_VAE)
    sys.path.insert(0, str(tmp_path))
    try:
        import conv

        torch.manual_seed(1)
        model = conv.ConvVAE()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("conv", None)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(12, 1, 8, 8)).astype(np.float32))
    arch = ["--arch", f"{tmp_path / 'conv.py'}:ConvVAE", "--likelihood", "gaussian", "--sigma", "0.5"]
    via_arch = json.loads(run("elbo", tmp_path / "w.safetensors", tmp_path / "x.npy", "-k", "64", "--json", *arch).stdout)
    assert "outputs read as means" in via_arch["model"]["description"]  # a Gaussian's means are not "logits"
    assert "logits" not in via_arch["model"]["description"]
    run("convert", tmp_path / "w.safetensors", *arch, "--data", tmp_path / "x.npy", "-o", tmp_path / "c.safetensors")
    converted = load_model(tmp_path / "c.safetensors")
    assert [layer.type for layer in converted.layers] == [
        "conv2d", "relu", "flatten", "linear", "linear", "tanh", "unflatten", "conv_transpose2d", "silu", "conv_transpose2d",
    ]
    result = evaluate(converted, load_data(tmp_path / "x.npy", converted), samples=64)
    np.testing.assert_allclose([p["iwae"] for p in via_arch["points"]], result.points.iwae, rtol=AGREEMENT, atol=AGREEMENT)


def test_normal_returning_encoder_and_flat_input_shape(examples):
    """encode may return a Normal; image-shaped data reaches a flat encode through --input-shape."""
    images = examples / "images.npy"
    np.save(images, np.load(examples / "data.npy").reshape(20, 1, 8, 8))
    flat = json.loads(run("elbo", examples / "weights.safetensors", examples / "data.npy", "-k", "16", "--json",
                          *_arch_args(examples, "NormalEncoder")).stdout)
    shaped = json.loads(run("elbo", examples / "weights.safetensors", images, "-k", "16", "--json",
                            *_arch_args(examples, "VAE", "--input-shape", "64")).stdout)
    for a, b in zip(flat["points"], shaped["points"], strict=False):
        assert a["iwae"] == pytest.approx(b["iwae"], rel=1e-5)


def test_loading_a_file_leaves_sys_modules_and_sys_path_as_they_were(examples):
    """The file runs as a module while it is imported, with its folder on sys.path; neither stays behind."""
    path, modules = list(sys.path), set(sys.modules)
    factory = load_architecture(f"{examples / 'vae.py'}:make_vae")
    assert isinstance(factory(dims=4, hidden=3, latent_dim=2), torch.nn.Module)
    (examples / "broken.py").write_text("raise ValueError('no GPU found')\n")
    with pytest.raises(VaeevalError, match="running .*broken.py raised ValueError: no GPU found"):
        load_architecture(f"{examples / 'broken.py'}:VAE")
    assert sys.path == path
    assert [name for name in set(sys.modules) - modules if name.startswith("vaeeval_arch_") or name == "vae"] == []


BROKEN = [
    ("file not found", lambda f: ["--arch", f"{f / 'missing.py'}:VAE"], "missing.py: no such file"),
    ("attribute missing", lambda f: ["--arch", f"{f / 'vae.py'}:VEA"], "has no attribute 'VEA' (it defines"),
    ("construction raises", lambda f: ["--arch", f"{f / 'vae.py'}:Exploding", "--arch-args", ARGS], "raised ValueError: no GPU found"),
    ("bad --arch-args", lambda f: ["--arch", f"{f / 'vae.py'}:VAE", "--arch-args", "{latent"], "--arch-args"),
    ("state dict mismatch",
     lambda f: ["--arch", f"{f / 'vae.py'}:VAE", "--arch-args", json.dumps({"dims": DIMS, "hidden": 16, "latent_dim": LATENT})],
     "fc1.weight is [32, 64] in the file, [16, 64] in the module"),
    ("encode wrong shape", lambda f: ["--arch", f"{f / 'vae.py'}:WrongShape", "--arch-args", ARGS],
     "encode(x) returned a mean of [2, 4] and a log-variance of [2, 3]"),
    ("probs outside [0, 1]", lambda f: ["--arch", f"{f / 'vae.py'}:Overshoot", "--arch-args", ARGS, "--decoder-output", "probs"],
     "outside [0, 1], but --decoder-output says probabilities"),
    ("no such method", lambda f: ["--arch", f"{f / 'vae.py'}:VAE", "--arch-args", ARGS, "--encode-method", "embed"],
     "has no method 'embed'"),
    ("options without --arch", lambda f: ["--sigma", "0.1"], "--sigma goes with --arch"),
    ("--arch without --likelihood", lambda f: ["--arch", f"{f / 'vae.py'}:VAE", "--arch-args", ARGS],
     "returns a tensor [2, 64]: say which distribution it parameterizes with --likelihood"),
    ("--sigma without --likelihood", lambda f: ["--arch", f"{f / 'vae.py'}:VAE", "--sigma", "0.1"], "--sigma goes with --likelihood"),
]


@pytest.mark.parametrize(("case", "options", "phrase"), BROKEN, ids=[case for case, _, _ in BROKEN])
def test_arch_errors_are_one_line_exit_2(examples, case, options, phrase):
    args = options(examples)
    if "--likelihood" not in args and "--arch" in args and "without --likelihood" not in case:
        args += ["--likelihood", "bernoulli"]
    result = run("elbo", examples / "weights.safetensors", examples / "data.npy", "-k", "4", *args, ok=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("vaeeval: error: ")
    assert phrase in result.stderr


def test_missing_and_unexpected_keys_are_listed_together(examples):
    tensors = {"fc1.weight": torch.zeros(HIDDEN, DIMS), "extra.bias": torch.zeros(3)}
    save_file(tensors, examples / "partial.safetensors")
    result = run("elbo", examples / "partial.safetensors", examples / "data.npy", *_arch_args(examples), ok=False)
    assert result.exit_code == 2
    assert "missing fc1.bias, fc21.weight" in result.stderr and "unexpected extra.bias" in result.stderr


def test_convert_names_what_format1_cannot_express(examples):
    result = run("convert", examples / "weights.safetensors", *_arch_args(examples, "Residual"), "--input-shape", "64",
                 "-o", examples / "r.safetensors", ok=False)
    assert result.exit_code == 2 and "decode: call_function add" in result.stderr and "one chain" in result.stderr
    assert not (examples / "r.safetensors").exists()


def test_readme_worked_example_runs(tmp_path, monkeypatch):
    """The README's --arch example, verbatim, on synthetic binarized 'MNIST' data."""
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Your own architecture", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    python_blocks = [code for language, code in blocks if language == "python"]
    commands = [line for language, code in blocks if language == "sh" for line in code.splitlines() if line.startswith("vaeeval ")]
    assert len(python_blocks) == 2 and len(commands) == 3
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "vae.py").write_text(python_blocks[0])
    torch.manual_seed(0)
    exec(compile(python_blocks[1], "save_weights.py", "exec"), {})
    sys.modules.pop("vae", None)
    np.save(tmp_path / "mnist_test.npy", (np.random.default_rng(0).random((10, 784)) < 0.2).astype(np.float32))
    outputs = [run(*shlex.split(command)[1:], "-k", "32" if "convert" not in command else "16").stdout for command in commands]
    assert "wrote vae.safetensors" in outputs[1]
    first, last = (re.search(r"│ iwae\s+│\s+(-?[\d.]+)", text).group(1) for text in (outputs[0], outputs[2]))
    assert float(first) == pytest.approx(float(last), abs=1e-3)


def test_gaussian_with_a_log_sigma_tensor_and_mean_output(examples):
    import importlib

    monkey = str(examples)
    sys.path.insert(0, monkey)
    try:
        torch.manual_seed(3)
        model = importlib.import_module("vae").GaussianVAE(dims=DIMS, hidden=HIDDEN, latent_dim=LATENT)
    finally:
        sys.path.remove(monkey)
        sys.modules.pop("vae", None)
    save_file(model.state_dict(), examples / "g.safetensors")
    np.save(examples / "real.npy", np.random.default_rng(4).normal(size=(15, DIMS)).astype(np.float32))
    arch = ["--arch", f"{examples / 'vae.py'}:GaussianVAE", "--arch-args", ARGS, "--likelihood", "gaussian",
            "--log-sigma-tensor", "log_sigma", "--decoder-output", "mean"]
    via_arch = json.loads(run("elbo", examples / "g.safetensors", examples / "real.npy", "-k", "32", "--json", *arch).stdout)
    assert via_arch["model"]["likelihood"] == {"family": "gaussian", "log_sigma": "log_sigma"}
    run("convert", examples / "g.safetensors", *arch, "--data", examples / "real.npy", "-o", examples / "g1.safetensors")
    converted = load_model(examples / "g1.safetensors")
    assert converted.likelihood.scale.item() == pytest.approx(np.exp(-0.7))
    result = evaluate(converted, load_data(examples / "real.npy", converted), samples=32)
    np.testing.assert_allclose([p["iwae"] for p in via_arch["points"]], result.points.iwae, rtol=AGREEMENT, atol=AGREEMENT)
    # the same numbers as scoring by hand with sigma = exp(-0.7): the tensor really is used
    assert via_arch["summary"]["measure"] == "density"


def test_ais_through_arch_anneals_through_the_users_decoder_as_its_conversion_does(examples):
    """Gradients flow through the user's own decode (its traced logits): the numbers of the format-1 twin."""
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    common = ["--steps", "4", "--leapfrog", "2", "--chains", "3", "-k", "32", "--json"]
    via_arch = json.loads(run("ais", weights, data, *common, *_arch_args(examples)).stdout)
    run("convert", weights, *_arch_args(examples), "--data", data, "-o", examples / "model.safetensors")
    via_format1 = json.loads(run("ais", examples / "model.safetensors", data, *common).stdout)
    assert via_arch["model"]["arch"] and via_format1["model"]["format"] == 1
    np.testing.assert_allclose([p["ais"] for p in via_arch["points"]], [p["ais"] for p in via_format1["points"]],
                               atol=1e-3, rtol=0)


def _weights_of(examples: Path, name: str, **kwargs) -> Path:
    """The state dict of vae.py's class ``name`` (the VAE's weights plus its own), as safetensors."""
    sys.path.insert(0, str(examples))
    try:
        import importlib

        vae_module = importlib.import_module("vae")
        torch.manual_seed(1)
        model = getattr(vae_module, name)(dims=DIMS, hidden=HIDDEN, latent_dim=LATENT, **kwargs)
    finally:
        sys.path.remove(str(examples))
        sys.modules.pop("vae", None)
    path = examples / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_an_nn_sigmoid_module_is_read_as_exact_logits_and_converts(examples):
    """pythae's decoders: an nn.Sigmoid module, and np.prod in a reshape (which torch.fx now traces)."""
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    function = json.loads(run("elbo", weights, data, "-k", "100", "--json", *_arch_args(examples)).stdout)
    module = json.loads(run("elbo", weights, data, "-k", "100", "--json", *_arch_args(examples, "SigmoidModule")).stdout)
    assert "logits read before its final sigmoid" in module["model"]["description"]
    assert [p["iwae"] for p in module["points"]] == [p["iwae"] for p in function["points"]]
    out = examples / "converted.safetensors"
    run("convert", weights, *_arch_args(examples, "SigmoidModule"), "--data", data, "-o", out)
    converted = json.loads(run("elbo", out, data, "-k", "100", "--json").stdout)
    for a, b in zip(converted["points"], function["points"], strict=True):
        assert abs(a["iwae"] - b["iwae"]) < AGREEMENT * max(1, abs(b["iwae"]))


def test_probabilities_declared_as_logits_warn_on_stderr_and_in_the_output(examples):
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    args = ["--arch", f"{examples / 'vae.py'}:VAE", "--arch-args", ARGS, "--likelihood", "bernoulli"]
    result = run("elbo", weights, data, "-k", "8", "--json", *args)
    warning = "every decode(z) output lies in [0, 1] although --decoder-output says logits"
    assert warning in result.stderr and result.stderr.count("\n") == 1
    assert any(warning in note for note in json.loads(result.stdout)["model"]["notes"])
    quiet = run("elbo", weights, data, "-k", "8", "--json", *args, "--decoder-output", "probs")
    assert quiet.stderr == ""


def test_a_missing_scale_names_both_ways_to_give_one(examples):
    weights = _weights_of(examples, "GaussianVAE")
    np.save(examples / "grey.npy", np.random.default_rng(0).random((4, DIMS)).astype(np.float32))
    result = run("elbo", weights, examples / "grey.npy", "--arch", f"{examples / 'vae.py'}:GaussianVAE", "--arch-args", ARGS,
                 "--likelihood", "gaussian", ok=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "--sigma" in result.stderr and "--log-sigma-tensor" in result.stderr and "64 values per point" in result.stderr


def test_tracing_failures_name_the_file_line_and_expression(examples):
    result = run("convert", examples / "weights.safetensors", *_arch_args(examples, "Untraceable"), "--input-shape", str(DIMS),
                 "-o", examples / "out.safetensors", ok=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"{examples / 'vae.py'}:" in result.stderr and "(if p.sum() > 0:" in result.stderr
    assert not (examples / "out.safetensors").exists()


def test_convert_writes_a_mixture_prior_and_refuses_unused_tensors_unless_allowed(examples):
    data = examples / "data.npy"
    mixture = _weights_of(examples, "MixturePrior")
    run("convert", mixture, *_arch_args(examples, "MixturePrior"), "--data", data, "-o", examples / "mixture.safetensors")
    assert load_model(examples / "mixture.safetensors").prior.family == "mixture_of_gaussians"
    # a VampPrior is a mixture through the encoder: kept, and its pseudo-inputs count as used; the stray head does not
    vamp = _weights_of(examples, "VampPrior")
    out = examples / "vamp.safetensors"
    refused = run("convert", vamp, *_arch_args(examples, "VampPrior"), "--data", data, "-o", out, ok=False)
    assert refused.exit_code == 2 and "--allow-unused" in refused.stderr
    assert "unused_head.weight, unused_head.bias of the state dict" in refused.stderr
    assert "pseudo_inputs" not in refused.stderr and not (examples / "vamp.safetensors").exists()
    allowed = run("convert", vamp, *_arch_args(examples, "VampPrior"), "--data", data, "-o", examples / "vamp.safetensors",
                  "--allow-unused")
    assert "mixture_of_gaussians prior" in allowed.stdout and "left out (--allow-unused): unused_head" in allowed.stdout
    via_arch = json.loads(run("elbo", vamp, data, "-k", "300", "--json", *_arch_args(examples, "VampPrior")).stdout)
    converted = json.loads(run("elbo", examples / "vamp.safetensors", data, "-k", "300", "--json").stdout)
    assert via_arch["model"]["prior"]["source"] == "prior()" and via_arch["summary"]["kl_kind"] == "monte_carlo"
    for a, b in zip(converted["points"], via_arch["points"], strict=True):
        assert abs(a["iwae"] - b["iwae"]) < AGREEMENT * max(1, abs(b["iwae"]))


@pytest.mark.parametrize(
    ("name", "extra", "phrase"),
    [
        ("FullCovariance", [], "encode(x) returns MultivariateNormal; format 1's q(z|x) is a diagonal Normal"),
        ("BernoulliDistribution", [], "decode(z) returns Bernoulli; format 1 holds a decoder giving the likelihood's parameters"),
    ],
)
def test_convert_refuses_what_format1_cannot_hold(examples, name, extra, phrase):
    args = ["--arch", f"{examples / 'vae.py'}:{name}", "--arch-args", ARGS, *extra]
    if name != "BernoulliDistribution":
        args += ["--likelihood", "bernoulli", "--decoder-output", "probs"]
    result = run("convert", examples / "weights.safetensors", *args, "--input-shape", str(DIMS), "-o", examples / "x.safetensors",
                 ok=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and phrase in result.stderr, result.stderr
    assert "--arch instead" in result.stderr


def test_compare_takes_arch_once_for_all_or_once_per_model(examples):
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    converted = examples / "model.safetensors"
    run("convert", weights, *_arch_args(examples), "--data", data, "-o", converted)
    both = json.loads(run("compare", weights, weights, data, "-k", "50", "--json", *_arch_args(examples)).stdout)
    assert [m["model"]["arch"] for m in both["models"]] == [f"{examples / 'vae.py'}:VAE"] * 2
    mixed = json.loads(run("compare", weights, converted, data, "-k", "50", "--json", "--arch", f"{examples / 'vae.py'}:VAE",
                           "--arch", "-", "--arch-args", ARGS, "--likelihood", "bernoulli", "--decoder-output", "probs").stdout)
    assert [m["model"]["format"] for m in mixed["models"]] == [None, 1]
    iwae = [m["summary"]["iwae"]["mean"] for m in mixed["models"]]
    assert abs(iwae[0] - iwae[1]) < 1e-4  # the model and its conversion
    wrong = run("compare", weights, weights, weights, data, "--arch", "a.py:A", "--arch", "b.py:B", ok=False)
    assert wrong.exit_code == 2 and "--arch is given 2 times for 3 models" in wrong.stderr


CATEGORICAL = '''
import torch
from torch import nn


class Categorical(nn.Module):
    """Levels-first probabilities from a final nn.Softmax over the levels (format 1's layout)."""

    def __init__(self, dims=6, levels=4, latent_dim=2):
        super().__init__()
        self.dims, self.levels = dims, levels
        self.encoder = nn.Linear(dims, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, levels * dims)
        self.softmax = nn.Softmax(dim=1)

    def encode(self, x):
        return self.encoder(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.softmax(self.decoder(z).view(-1, self.levels, self.dims))


class LevelsLast(Categorical):
    def decode(self, z):
        return torch.softmax(self.decoder(z).view(-1, self.dims, self.levels), dim=-1)
'''


def test_a_final_softmax_module_is_read_as_logits_and_a_softmax_over_the_wrong_axis_is_refused(tmp_path):
    (tmp_path / "cat.py").write_text(CATEGORICAL)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        torch.manual_seed(0)
        module = importlib.import_module("cat").Categorical()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cat", None)
    save_file(module.state_dict(), tmp_path / "cat.safetensors")
    np.save(tmp_path / "x.npy", (np.random.default_rng(0).integers(0, 4, (10, 6)) / 3).astype(np.float32))
    args = ["--likelihood", "categorical", "--levels", "4", "--decoder-output", "probs"]
    weights, data = tmp_path / "cat.safetensors", tmp_path / "x.npy"
    arch = json.loads(run("elbo", weights, data, "-k", "50", "--json", "--arch", f"{tmp_path / 'cat.py'}:Categorical", *args).stdout)
    assert "logits read before its final softmax" in arch["model"]["description"]
    run("convert", weights, "--arch", f"{tmp_path / 'cat.py'}:Categorical", *args, "--data", data, "-o", tmp_path / "c.safetensors")
    converted = json.loads(run("elbo", tmp_path / "c.safetensors", data, "-k", "50", "--json").stdout)
    for a, b in zip(converted["points"], arch["points"], strict=True):
        assert abs(a["iwae"] - b["iwae"]) < AGREEMENT * max(1, abs(b["iwae"]))
    wrong = run("elbo", weights, data, "--arch", f"{tmp_path / 'cat.py'}:LevelsLast", *args, ok=False)
    assert wrong.exit_code == 2 and "probabilities sum to" in wrong.stderr and "[levels, *input_shape]" in wrong.stderr


# A framework's loader: a factory that names ``weights`` is given the weights file's path (to read a config beside it),
# and a module that knows format 1 cannot hold it says why in ``not_convertible``.
FRAMEWORK = '''
from pathlib import Path

from vae import VAE


def from_folder(weights, **kwargs):
    config = Path(weights).parent / "vae.py"
    if not config.is_file():
        raise ValueError(f"no vae.py beside {weights}")
    return VAE(**kwargs)


class Opaque(VAE):
    not_convertible = "Opaque: made of blocks format 1 has no layer for; evaluate it as it is with --arch"
'''


def test_a_factory_naming_weights_is_given_their_path(examples):
    (examples / "framework.py").write_text(FRAMEWORK)
    weights, data = examples / "weights.safetensors", examples / "data.npy"
    options = ["--arch-args", ARGS, "--likelihood", "bernoulli", "--decoder-output", "probs", "-k", "16", "--json"]
    by_path = json.loads(run("elbo", weights, data, "--arch", f"{examples / 'framework.py'}:from_folder", *options).stdout)
    plain = json.loads(run("elbo", weights, data, "--arch", f"{examples / 'vae.py'}:VAE", *options).stdout)
    assert by_path["points"] == plain["points"]
    elsewhere = examples / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights.safetensors").write_bytes(weights.read_bytes())
    result = run("elbo", elsewhere / "weights.safetensors", data, "--arch", f"{examples / 'framework.py'}:from_folder", *options,
                 ok=False)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"raised ValueError: no vae.py beside {elsewhere / 'weights.safetensors'}" in result.stderr


def test_convert_refuses_a_module_that_says_it_is_not_convertible(examples):
    (examples / "framework.py").write_text(FRAMEWORK)
    result = run("convert", examples / "weights.safetensors", "--arch", f"{examples / 'framework.py'}:Opaque", "--arch-args", ARGS,
                 "--likelihood", "bernoulli", "--decoder-output", "probs", "--input-shape", str(DIMS), "-o",
                 examples / "x.safetensors", ok=False)
    assert result.exit_code == 2
    assert result.stderr == (
        "vaeeval: error: convert: Opaque: made of blocks format 1 has no layer for; evaluate it as it is with --arch\n"
    )
    assert not (examples / "x.safetensors").exists()
