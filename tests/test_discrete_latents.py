"""--arch models with discrete latents: a 10-way categorical and eight Bernoulli units, against exact sums."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from scipy import special
from torch.distributions import Normal, kl_divergence, register_kl

from vaeeval.cli import main
from vaeeval.user.distributions import analytic_kl

MODELS = '''
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, OneHotCategorical


class CategoricalVAE(nn.Module):
    """One 10-way categorical latent, one-hot, a learned prior; six Bernoulli pixels."""

    def __init__(self, dims=6, classes=10):
        super().__init__()
        self.encoder = nn.Linear(dims, classes)
        self.decoder = nn.Linear(classes, dims)
        self.prior_logits = nn.Parameter(torch.zeros(classes))

    def encode(self, x):
        return OneHotCategorical(logits=self.encoder(x))

    def decode(self, z):
        return Independent(Bernoulli(logits=self.decoder(z)), 1)

    def prior(self):
        return OneHotCategorical(logits=self.prior_logits)


class BernoulliVAE(nn.Module):
    """Eight Bernoulli latents under a prior without batch dimensions, as users write it."""

    def __init__(self, dims=6, latent=8):
        super().__init__()
        self.encoder = nn.Linear(dims, latent)
        self.decoder = nn.Linear(latent, dims)

    def encode(self, x):
        return Independent(Bernoulli(logits=self.encoder(x)), 1)

    def decode(self, z):
        return Independent(Bernoulli(logits=self.decoder(z)), 1)

    def prior(self):
        return Independent(Bernoulli(0.5 * torch.ones(8)), 1)
'''

DIMS, CLASSES, UNITS = 6, 10, 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """models.py, each model's weights (random, fixed) and 12 binary points."""
    folder = tmp_path_factory.mktemp("discrete")
    (folder / "models.py").write_text(MODELS)
    sys.path.insert(0, str(folder))
    try:
        import importlib

        module = importlib.import_module("models")
        torch.manual_seed(0)
        for name in ("CategoricalVAE", "BernoulliVAE"):
            model = getattr(module, name)()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(torch.randn_like(parameter) * 1.5)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{name}.safetensors")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("models", None)
    np.save(folder / "x.npy", (np.random.default_rng(0).random((12, DIMS)) < 0.4).astype(np.float32))
    return folder


def _run(folder, name, *args):
    weights, data = str(folder / f"{name}.safetensors"), str(folder / "x.npy")
    return CliRunner().invoke(main, [*args[:1], weights, data, "--arch", f"{folder / 'models.py'}:{name}", *args[1:]])


def _json(folder, name, *args):
    result = _run(folder, name, "elbo", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _weights(folder, name):
    from safetensors.numpy import load_file

    return {k: v.astype(np.float64) for k, v in load_file(folder / f"{name}.safetensors").items()}


def _log_bernoulli(x, logits):
    """sum_d log Bernoulli(x_d; sigmoid(logits_d)), float64."""
    return (x * logits - np.logaddexp(0, logits)).sum(-1)


def test_bernoulli_prior_without_batch_dimensions_gives_the_closed_form_kl(folder):
    document = _json(folder, "BernoulliVAE", "-k", "20")
    assert document["model"]["kl"] == "analytic"
    w = _weights(folder, "BernoulliVAE")
    x = np.load(folder / "x.npy").astype(np.float64)
    p = special.expit(x @ w["encoder.weight"].T + w["encoder.bias"])
    kl = (p * np.log(p / 0.5) + (1 - p) * np.log((1 - p) / 0.5)).sum(-1)
    np.testing.assert_allclose([point["kl"] for point in document["points"]], kl, rtol=1e-6)


class _Failing(Normal):
    pass


@register_kl(_Failing, _Failing)
def _kl_failing(p, q):
    raise IndexError("a closed form that breaks")


def test_a_closed_form_that_fails_for_any_reason_falls_back_to_sampling():
    posterior, prior = _Failing(torch.zeros(3), 1.0), _Failing(torch.zeros(()), 1.0)
    with pytest.raises(IndexError):
        kl_divergence(posterior, prior)
    assert analytic_kl(posterior, prior) is None
    # and a prior without the batch dimension is broadcast to it first
    assert analytic_kl(Normal(torch.zeros(3), 1.0), Normal(torch.zeros(()), 2.0)).shape == (3,)


@pytest.mark.parametrize("command", ["ais", "bdmc"])
def test_annealing_a_discrete_latent_is_refused_in_one_line(folder, command):
    if command == "bdmc":
        weights, arch = str(folder / "CategoricalVAE.safetensors"), f"{folder / 'models.py'}:CategoricalVAE"
        result = CliRunner().invoke(main, ["bdmc", weights, "--arch", arch, "--input-shape", str(DIMS)])
    else:
        result = _run(folder, "CategoricalVAE", "ais")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "the latent is discrete (q(z|x) OneHotCategorical and p(z) OneHotCategorical)" in result.stderr
    assert "HMC, which needs a continuous latent" in result.stderr and "--enumerate" in result.stderr
