"""Format 1's discrete latent (docs/FORMAT.md, "A discrete latent"): a categorical or Bernoulli q(z|x) from the
encoder's logits, a prior of the same family, evaluated exactly by summing over z.

References: log p(x) = log Σ_z p(x|z) p(z) and the ELBO Σ_z q(z|x) [log p(x|z) + log p(z) − log q(z|x)]
by enumeration in float64 from the same networks run in float64 (vaeeval's run in float32, so the
two agree to float32 rounding of the logits); the same numbers for every batch size, bit for bit;
the same as the model written as an --arch class; bad blocks one line each.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from vaeeval import evaluate, load_data, load_model, save_model
from vaeeval.cli import main
from vaeeval.errors import SpecError, VaeevalError

DIMS, HIDDEN = 6, 8
FLOAT32_LOGITS = 2e-6  # relative: vaeeval's float32 networks against the same networks in float64


def _nets(latent: int, seed: int) -> tuple[nn.Sequential, nn.Sequential]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIMS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, latent)), nn.Sequential(nn.Linear(latent, DIMS))


def _support(family: str, latent: int) -> np.ndarray:
    if family == "categorical":
        return np.eye(latent)
    return np.array(list(itertools.product([0.0, 1.0], repeat=latent)))


def _log_q(family: str, logits: np.ndarray, values: np.ndarray) -> np.ndarray:
    """log q(z|x) ``[N, M]`` of every value ``[M, L]`` from logits ``[N, L]``."""
    if family == "categorical":
        log_softmax = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        return log_softmax @ values.T
    log_on, log_off = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
    return log_on @ values.T + log_off @ (1 - values).T


def _reference(encoder, decoder, family, prior_logits, x):
    """log p(x) and the ELBO per point by enumeration, float64 networks."""
    double = lambda net, v: net.double()(torch.as_tensor(v, dtype=torch.float64)).detach().numpy()
    latent = encoder[-1].out_features
    values = _support(family, latent)
    log_q = _log_q(family, double(encoder, x), values)
    log_p_z = _log_q(family, np.broadcast_to(prior_logits, (1, latent)), values)[0]
    decoder_logits = double(decoder, values)  # [M, D]
    log_px_z = x @ (-np.logaddexp(0, -decoder_logits)).T + (1 - x) @ (-np.logaddexp(0, decoder_logits)).T  # [N, M]
    joint = log_px_z + log_p_z
    q = np.exp(log_q)
    return np.logaddexp.reduce(joint, axis=1), (q * (joint - log_q)).sum(axis=1)


@pytest.fixture(scope="module", params=["categorical", "bernoulli"])
def written(request, tmp_path_factory):
    family = request.param
    latent = 5 if family == "categorical" else 3
    folder = tmp_path_factory.mktemp(family)
    encoder, decoder = _nets(latent, seed=1)
    prior_logits = torch.randn(latent) if family == "categorical" else None  # bernoulli: the uniform prior, by default
    path = folder / "model.safetensors"
    save_model(path, encoder, decoder, likelihood={"family": "bernoulli"}, input_shape=[DIMS], latent_dim=latent,
               posterior={"family": family}, prior=None if prior_logits is None else {"family": family, "logits": prior_logits})
    x = (np.random.default_rng(2).random((23, DIMS)) < 0.4).astype(np.float32)
    np.save(folder / "x.npy", x)
    logits = np.zeros(latent) if prior_logits is None else prior_logits.numpy().astype(np.float64)
    return family, path, folder / "x.npy", x, _reference(encoder, decoder, family, logits, x.astype(np.float64))


def test_log_px_and_the_elbo_are_the_enumerated_sums(written):
    family, path, data_path, x, (log_px, elbo) = written
    model = load_model(path)
    result = evaluate(model, load_data(data_path, model), samples=10)
    np.testing.assert_allclose(result.points.iwae, log_px, rtol=FLOAT32_LOGITS)
    np.testing.assert_allclose(result.points.elbo, elbo, rtol=FLOAT32_LOGITS)
    assert np.all(result.points.iwae_stderr == 0) and np.all(result.points.elbo <= result.points.iwae)
    sampled = evaluate(model, load_data(data_path, model), samples=4000, enumerate_latent=False)
    error = sampled.points.iwae_stderr
    assert np.all(np.abs(sampled.points.iwae - log_px) < 4 * error + 1e-3)  # keyed draws from the same q


def test_every_batch_size_gives_the_same_bits(written):
    _, path, data_path, _, _ = written
    model = load_model(path)
    data = load_data(data_path, model)
    runs = [evaluate(model, data, samples=64, batch_size=b, enumerate_latent=False) for b in (1, 7, 100)]
    for run in runs[1:]:
        for name in ("elbo", "recon", "kl", "iwae"):
            np.testing.assert_array_equal(getattr(run.points, name), getattr(runs[0].points, name), err_msg=name)


ARCH = '''
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, OneHotCategorical


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5))
        self.decoder = nn.Sequential(nn.Linear(5, 6))
        self.prior_logits = nn.Parameter(torch.zeros(5))

    def encode(self, x):
        return OneHotCategorical(logits=self.encoder(x))

    def decode(self, z):
        return self.decoder(z)

    def prior(self):
        return OneHotCategorical(logits=self.prior_logits)
'''


@pytest.mark.parametrize("written", ["categorical"], indirect=True)
def test_the_same_model_through_arch_gives_the_same_numbers(written, tmp_path):
    family, path, data_path, _, _ = written
    from safetensors.torch import load_file

    tensors = load_file(path)
    (tmp_path / "twin.py").write_text(ARCH)
    state = {name: tensors[name] for name in tensors if name.startswith(("encoder.", "decoder."))}
    state["prior_logits"] = tensors["prior.logits"]
    save_file(state, tmp_path / "weights.safetensors")
    runner = CliRunner()
    own = json.loads(runner.invoke(main, ["elbo", str(path), str(data_path), "--json"]).stdout)
    arch = runner.invoke(main, ["elbo", str(tmp_path / "weights.safetensors"), str(data_path), "--json",
                                "--arch", f"{tmp_path / 'twin.py'}:Model", "--likelihood", "bernoulli"])
    assert arch.exit_code == 0, arch.stderr
    twin = json.loads(arch.stdout)
    for a, b in zip(own["points"], twin["points"], strict=True):
        assert a["iwae"] == pytest.approx(b["iwae"], rel=1e-6)
    assert any(note.startswith("log p(x) exact: summed over all 5 values of z") for note in own["model"]["notes"])


def test_ais_and_calibrate_refuse_a_discrete_latent_in_one_line(written, tmp_path):
    _, path, data_path, _, _ = written
    runner = CliRunner()
    ais = runner.invoke(main, ["ais", str(path), str(data_path)])
    assert ais.exit_code == 2 and ais.stderr.count("\n") == 1 and "--enumerate" in ais.stderr, ais.stderr
    inspect = runner.invoke(main, ["inspect", str(path)])
    assert inspect.exit_code == 0, inspect.stderr


def _document(**changes):
    encoder, decoder = _nets(4, seed=3)
    document = {"format": 1, "input_shape": [DIMS], "latent_dim": 4, "likelihood": {"family": "bernoulli"},
                "encoder": [{"type": "linear", "tensor": "encoder.0"}, {"type": "tanh"}, {"type": "linear", "tensor": "encoder.2"}],
                "decoder": [{"type": "linear", "tensor": "decoder.0"}], "posterior": {"family": "categorical"}}
    tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()} | {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    tensors["prior.logits"] = torch.zeros(4)
    document.update(changes)
    return document, tensors


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"latent_dim": 2}, "a categorical posterior with latent_dim 2 needs [2] logits"),
        ({"prior": {"family": "standard_normal"}}, "a standard_normal prior cannot go with a categorical posterior"),
        ({"posterior": None, "prior": {"family": "categorical"}}, "a categorical prior cannot go with a gaussian posterior"),
        ({"prior": {"family": "bernoulli"}}, "a bernoulli prior cannot go with a categorical posterior"),
        ({"prior": {"family": "categorical", "logits": "encoder.0.bias"}}, "prior: logits tensor 'encoder.0.bias' is [8], expected [4]"),
        ({"posterior": {"family": "poisson"}}, "posterior: family must be one of gaussian, categorical, bernoulli"),
        ({"posterior": {"family": "categorical", "variance_floor": 0.1}}, '"posterior" of family categorical takes family'),
    ],
)
def test_bad_discrete_latent_blocks_are_one_line(tmp_path, changes, phrase):
    from vaeeval.format.reading import build_model

    document, tensors = _document(**changes)
    if document.get("posterior") is None:
        document.pop("posterior")
        document["encoder"][-1] = {"type": "linear", "tensor": "wide"}
        tensors["wide.weight"], tensors["wide.bias"] = torch.zeros(8, HIDDEN), torch.zeros(8)
        del tensors["encoder.2.weight"], tensors["encoder.2.bias"]
    if "logits" not in json.dumps(document.get("prior", {})):
        tensors.pop("prior.logits")
    with pytest.raises(SpecError) as raised:
        build_model(document, tensors, None)
    assert phrase in str(raised.value) and "\n" not in str(raised.value)


def test_the_uniform_prior_is_the_default_and_its_kl_is_exact(written):
    family, path, data_path, x, _ = written
    model = load_model(path)
    result = evaluate(model, load_data(data_path, model), samples=10)
    np.testing.assert_allclose(result.points.elbo, result.points.recon - result.points.kl, rtol=1e-12)
    if family == "bernoulli":
        assert model.prior.spec == {"family": "bernoulli"} and math.isclose(
            float(model.prior.distribution(torch.zeros(())).log_prob(torch.zeros(3, dtype=torch.float64))), 3 * math.log(0.5))


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
def test_convert_writes_a_discrete_latent_into_format_1_and_it_evaluates_the_same(tmp_path, family):
    """convert traces encode up to the logits a OneHotCategorical or Independent(Bernoulli) is built from, writes
    posterior and prior blocks of that family, and keeps the file only where every number agrees."""
    source = ARCH if family == "categorical" else ARCH.replace("OneHotCategorical(logits=self.encoder(x))",
        "Independent(Bernoulli(logits=self.encoder(x)), 1)").replace("OneHotCategorical(logits=self.prior_logits)",
        "Independent(Bernoulli(logits=self.prior_logits), 1)")
    (tmp_path / "twin.py").write_text(source)
    torch.manual_seed(4)
    import importlib.util

    spec = importlib.util.spec_from_file_location("twin_for_convert", tmp_path / "twin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.Model()
    with torch.no_grad():
        net.prior_logits.normal_()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "weights.safetensors")
    x = (np.random.default_rng(5).random((17, DIMS)) < 0.5).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    runner = CliRunner()
    arch = ["--arch", f"{tmp_path / 'twin.py'}:Model", "--likelihood", "bernoulli"]
    converted = runner.invoke(main, ["convert", str(tmp_path / "weights.safetensors"), *arch, "--input-shape", str(DIMS),
                                     "-o", str(tmp_path / "model.safetensors")])
    assert converted.exit_code == 0, converted.stderr
    model = load_model(tmp_path / "model.safetensors")
    assert model.posterior_family == family and model.prior.spec["family"] == family
    own = json.loads(runner.invoke(main, ["elbo", str(tmp_path / "model.safetensors"), str(tmp_path / "x.npy"), "--json"]).stdout)
    twin = json.loads(runner.invoke(main, ["elbo", str(tmp_path / "weights.safetensors"), str(tmp_path / "x.npy"), "--json",
                                           *arch]).stdout)
    for a, b in zip(own["points"], twin["points"], strict=True):
        for name in ("elbo", "kl", "iwae"):
            assert a[name] == pytest.approx(b[name], rel=1e-6), name
    # the names are back in place after tracing
    assert module.OneHotCategorical is torch.distributions.OneHotCategorical
    assert torch.distributions.Independent.__name__ == "Independent"


def test_a_format_1_discrete_model_read_raw_is_refused_with_the_way_out(written):
    from vaeeval.format.reading import load_model as load_raw

    _, path, data_path, _, _ = written
    raw = load_raw(path)
    with pytest.raises(VaeevalError, match="read it with vaeeval.load_model"):
        evaluate(raw, np.load(data_path))


def test_compare_sums_over_a_discrete_latent_too_and_takes_the_same_switches(written):
    family, path, data_path, _, (log_px, _) = written
    runner = CliRunner()
    exact = json.loads(runner.invoke(main, ["compare", str(path), str(path), str(data_path), "--json"]).stdout)
    sampled = json.loads(runner.invoke(main, ["compare", str(path), str(path), str(data_path), "--json", "--no-enumerate",
                                              "-k", "20"]).stdout)
    assert exact["models"][0]["summary"]["iwae"]["mean"] == pytest.approx(float(np.mean(log_px)), rel=FLOAT32_LOGITS)
    assert exact["models"][0]["summary"]["iwae"]["mean"] != sampled["models"][0]["summary"]["iwae"]["mean"]
    refused = runner.invoke(main, ["compare", str(path), str(path), str(data_path), "--enumerate", "--max-support", "2"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and "more than --max-support 2" in refused.stderr


def test_latents_gives_the_exact_mutual_information_of_a_discrete_latent(written):
    """I(x; z) = (1/N) Σ_n Σ_z q(z|x_n) log(q(z|x_n) / q(z)) summed over every value of z, against numpy from the
    encoder's float64 logits (the Gaussian approximation used for continuous latents would be meaningless here)."""
    family, path, data_path, x, _ = written
    found = CliRunner().invoke(main, ["latents", str(path), str(data_path), "--json"])
    assert found.exit_code == 0, found.stderr
    health = json.loads(found.stdout)["latents"]
    from safetensors.torch import load_file

    tensors = {k: v.double() for k, v in load_file(path).items()}
    hidden = np.tanh(x @ tensors["encoder.0.weight"].numpy().T + tensors["encoder.0.bias"].numpy())
    logits = hidden @ tensors["encoder.2.weight"].numpy().T + tensors["encoder.2.bias"].numpy()
    values = _support(family, logits.shape[1])
    log_q = _log_q(family, logits, values)  # [N, M]
    log_aggregate = np.log(np.exp(log_q).mean(axis=0))
    expected = float(np.mean((np.exp(log_q) * (log_q - log_aggregate)).sum(axis=1)))
    assert health["mutual_information"] == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert 0 <= health["mutual_information"] <= health["mutual_information_max"]
    assert health["aggregate_kl"] == pytest.approx(health["mean_kl"] - health["mutual_information"], abs=1e-12)
