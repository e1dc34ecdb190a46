"""--arch models that speak torch.distributions: posteriors, priors and likelihoods, checked against exact answers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from scipy import special, stats
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vaeeval import evaluate
from vaeeval.cli import main
from vaeeval.estimators.annealing.ais import AISOptions, evaluate_ais
from vaeeval.estimators.annealing.bdmc import run_bdmc
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.format.data import covariate_headers, load_data, point_shape
from vaeeval.format.domains import Grid
from vaeeval.format.terms import DENSITY, MONTE_CARLO, PROBABILITY
from vaeeval.results.schemas import schema
from vaeeval.user.arch import ArchOptions, arch_model
from vaeeval.user.protocol import ASSUMED, ArchModel, as_posterior, standard_normal

MODELS = '''
import torch
from torch import nn
from torch.distributions import (AffineTransform, Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal,
                                 Poisson, Transform, TransformedDistribution, constraints)


class FullCovariancePPCA(nn.Module):
    """x = W z + b + sigma * noise with W not orthogonal: the exact posterior has a full covariance."""

    def __init__(self, dims=5, latent=3, sigma=0.4):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(dims, latent))
        self.b = nn.Parameter(torch.zeros(dims))
        self.sigma = sigma

    def encode(self, x):
        W = self.W.double()
        precision = W.T @ W + self.sigma**2 * torch.eye(W.shape[1], dtype=torch.float64)
        covariance = self.sigma**2 * torch.linalg.inv(precision)
        mean = torch.linalg.solve(precision, W.T @ (x.double() - self.b.double()).T).T
        return MultivariateNormal(mean, covariance_matrix=covariance.expand(x.shape[0], -1, -1))

    def decode(self, z):
        return Independent(Normal(z @ self.W.T + self.b, self.sigma), 1)


class FullCovarianceWithPrior(FullCovariancePPCA):
    def prior(self):
        latent = self.W.shape[1]
        return MultivariateNormal(torch.zeros(latent), torch.eye(latent))


class MixturePrior(nn.Module):
    """A linear-Gaussian decoder under a learned mixture prior; a broad diagonal q."""

    def __init__(self, dims=3, latent=2, components=3, sigma=0.5):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(dims, latent))
        self.b = nn.Parameter(torch.zeros(dims))
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.zeros(components, latent))
        self.log_scales = nn.Parameter(torch.zeros(components, latent))
        self.sigma = sigma

    def encode(self, x):
        precision = self.W.T @ self.W + self.sigma**2 * torch.eye(self.W.shape[1])
        mean = torch.linalg.solve(precision, self.W.T @ (x - self.b).T).T
        return mean, torch.full_like(mean, 0.5)

    def decode(self, z):
        return Independent(Normal(z @ self.W.T + self.b, self.sigma), 1)

    def prior(self):
        components = Independent(Normal(self.means, self.log_scales.exp()), 1)
        return MixtureSameFamily(Categorical(logits=self.logits), components)


class PoissonDecoder(nn.Module):
    """One latent, log-rates linear in z: E_q[log p(x|z)] has a closed form, log p(x) a 1-D integral."""

    def __init__(self, dims=4):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dims))
        self.c = nn.Parameter(torch.zeros(dims))
        self.encoder = nn.Linear(dims, 2)

    def encode(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, log_var

    def decode(self, z):
        return Poisson((z * self.w + self.c).exp())


class AffineFlow(nn.Module):
    """q(z|x) a diagonal Normal pushed through an affine flow; Absorbed writes the same q as one Normal."""

    def __init__(self, dims=6, latent=2):
        super().__init__()
        self.encoder = nn.Linear(dims, 2 * latent)
        self.shift = nn.Parameter(torch.zeros(latent))
        self.log_scale = nn.Parameter(torch.zeros(latent))
        self.decoder = nn.Linear(latent, dims)

    def base(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, (0.5 * log_var).exp()

    def encode(self, x):
        mean, std = self.base(x)
        flow = AffineTransform(self.shift, self.log_scale.exp(), event_dim=1)
        return TransformedDistribution(Independent(Normal(mean, std), 1), [flow])

    def decode(self, z):
        return self.decoder(z)


class NormalDecode(AffineFlow):
    """decode returns Normal(mean, 2**-7) itself (a scale float32 holds exactly): its bins go through the distribution."""

    def encode(self, x):
        return Independent(Normal(*self.base(x)), 1)

    def decode(self, z):
        return Independent(Normal(self.decoder(z), 2**-7), 1)


class MeanDecode(NormalDecode):
    """The same model, decode returning the mean: scored with --likelihood gaussian --sigma 2**-7."""

    def decode(self, z):
        return self.decoder(z)


class OwnNormal(Normal):
    """A Normal of the user's own class: vaeeval takes its bins from its cdf and, in the tails, its density."""


class OwnNormalDecode(NormalDecode):
    def decode(self, z):
        return Independent(OwnNormal(self.decoder(z), 2**-7), 1)


class Absorbed(AffineFlow):
    def encode(self, x):
        mean, std = self.base(x)
        scale = self.log_scale.exp()
        return Independent(Normal(self.shift + scale * mean, scale * std), 1)


class Plain(AffineFlow):
    """The encoder's (mean, log_var) as they are: format 1's fast path."""

    def encode(self, x):
        mean, log_var = self.encoder(x).chunk(2, dim=-1)
        return mean, log_var


class OneWay(Transform):
    """z -> z + tanh(z) / 2: a flow step with no inverse (as an IAF's is in practice), log|det| from its input."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self):
        super().__init__(cache_size=1)

    def _call(self, z):
        return z + torch.tanh(z) / 2

    def log_abs_det_jacobian(self, z, y):
        return torch.log1p((1 - torch.tanh(z) ** 2) / 2).sum(-1)


class OneWayFlow(AffineFlow):
    def encode(self, x):
        mean, std = self.base(x)
        return TransformedDistribution(Independent(Normal(mean, std), 1), [OneWay()])


class PriorTensor(PoissonDecoder):
    def prior(self):
        return torch.zeros(1)


class PriorShape(PoissonDecoder):
    def prior(self):
        return Independent(Normal(torch.zeros(3), torch.ones(3)), 1)


class DecodeShape(PoissonDecoder):
    def decode(self, z):
        return Poisson((z * self.w[:3] + self.c[:3]).exp())


class EncodeShape(PoissonDecoder):
    def encode(self, x):
        return Normal(torch.zeros(x.shape[0] + 1, 1), 1.0)


class ConditionalPPCA(nn.Module):
    """x = W z + offsets[y] + sigma * noise: encode(x, y) gives the exact posterior, so IWAE = log p(x | y)."""

    def __init__(self, dims=4, latent=2, classes=3, sigma=0.5):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(dims, latent))
        self.offsets = nn.Embedding(classes, dims)
        self.sigma = sigma

    def encode(self, x, y):
        W = self.W.double()
        precision = W.T @ W + self.sigma**2 * torch.eye(W.shape[1], dtype=torch.float64)
        covariance = self.sigma**2 * torch.linalg.inv(precision)
        centred = x.double() - self.offsets(y).double()
        mean = torch.linalg.solve(precision, W.T @ centred.T).T
        return MultivariateNormal(mean, covariance_matrix=covariance.expand(x.shape[0], -1, -1))

    def decode(self, z, y):
        return Independent(Normal(z @ self.W.T + self.offsets(y), self.sigma), 1)
'''


@pytest.fixture
def models(tmp_path):
    """models.py in a folder, imported once for building weights."""
    (tmp_path / "models.py").write_text(MODELS)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        yield tmp_path, importlib.import_module("models")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("models", None)


def _save(module: torch.nn.Module, folder: Path, name: str) -> Path:
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
    return path


def _load(folder: Path, weights: Path, data: Path, name: str, key: str | None = None, covariates=(), **options):
    """The model ``name`` of models.py with these weights, and its data (``key`` of an .npz, with covariates)."""
    arch = ArchOptions(f"{folder / 'models.py'}:{name}", covariates=covariates, **options)
    model = arch_model(weights, arch, point_shape(data, key=key), covariate_headers(data, covariates, key=key))
    return model, load_data(data, model, key=key, covariates=covariates)


def _non_orthogonal(dims: int, latent: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(dims, latent)) + 0.8  # correlated columns: W^T W far from diagonal
    return W.astype(np.float32), rng.normal(size=dims).astype(np.float32)


def _ppca_log_px(x: np.ndarray, W: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    cov = W.astype(np.float64) @ W.T.astype(np.float64) + sigma**2 * np.eye(W.shape[0])
    return stats.multivariate_normal(b.astype(np.float64), cov).logpdf(x)


@pytest.mark.parametrize("name", ["FullCovariancePPCA", "FullCovarianceWithPrior"])
@pytest.mark.parametrize("samples", [1, 7, 100])
def test_full_covariance_exact_posterior_gives_log_px_for_any_k(models, name, samples):
    folder, module = models
    model = getattr(module, name)()
    W, b = _non_orthogonal(5, 3, seed=1)
    assert abs(np.corrcoef(W.T)[0, 1]) > 0.1  # the posterior's covariance is not diagonal
    with torch.no_grad():
        model.W.copy_(torch.from_numpy(W))
        model.b.copy_(torch.from_numpy(b))
    x = (np.random.default_rng(2).normal(size=(9, 3)) @ W.T + b + 0.4 * np.random.default_rng(3).normal(size=(9, 5)))
    np.save(folder / "x.npy", x.astype(np.float32))
    loaded, data = _load(folder, _save(model, folder, name), folder / "x.npy", name)
    assert loaded.general
    result = evaluate(loaded, data, samples=samples, seed=5)
    exact = _ppca_log_px(data.array.astype(np.float64), W, b, 0.4)
    # every importance weight equals p(x): IWAE is log p(x) to float32 rounding
    np.testing.assert_allclose(result.points.iwae, exact, atol=2e-4)
    assert result.measure == DENSITY
    # with prior() a MultivariateNormal, torch has KL(MVN || MVN) in closed form, and the ELBO (recon - KL)
    # is log p(x) in expectation; without prior(), N(0, I) is assumed (an Independent Normal, no closed form
    # against a MultivariateNormal): the KL comes from the draws, and the ELBO is the mean log-weight, exact
    if name == "FullCovarianceWithPrior":
        assert result.kl_kind != MONTE_CARLO and not loaded.notes
        if samples > 1:
            assert np.all(np.abs(result.points.elbo - exact) < 5 * result.points.elbo_stderr)
    else:
        assert result.kl_kind == MONTE_CARLO and any("N(0, I) assumed" in note for note in loaded.notes)
        np.testing.assert_allclose(result.points.elbo, exact, atol=2e-4)


def _mixture_log_px(x, W, b, sigma, logits, means, scales):
    weights = special.log_softmax(logits)
    terms = []
    for k in range(len(logits)):
        cov = W @ np.diag(scales[k] ** 2) @ W.T + sigma**2 * np.eye(W.shape[0])
        terms.append(weights[k] + stats.multivariate_normal(W @ means[k] + b, cov).logpdf(x))
    return special.logsumexp(np.stack(terms), axis=0)


def test_mixture_prior_from_prior_method_against_closed_form(models):
    folder, module = models
    model = module.MixturePrior()
    rng = np.random.default_rng(4)
    parameters = {
        "W": rng.normal(size=(3, 2)), "b": rng.normal(size=3), "logits": np.array([0.3, -0.2, 0.1]),
        "means": rng.normal(size=(3, 2)) * 1.5, "log_scales": rng.normal(size=(3, 2)) * 0.3 - 0.5,
    }
    parameters = {k: v.astype(np.float32) for k, v in parameters.items()}
    with torch.no_grad():
        for name, value in parameters.items():
            getattr(model, name).copy_(torch.from_numpy(value))
    x = rng.normal(size=(12, 3)).astype(np.float32) * 2
    np.save(folder / "x.npy", x)
    loaded, data = _load(folder, _save(model, folder, "mixture"), folder / "x.npy", "MixturePrior")
    samples = 20000
    result = evaluate(loaded, data, samples=samples, seed=0)
    p = {k: v.astype(np.float64) for k, v in parameters.items()}
    exact = _mixture_log_px(x.astype(np.float64), p["W"], p["b"], 0.5, p["logits"], p["means"], np.exp(p["log_scales"]))
    # IWAE is unbiased for p(x), biased for log p(x) by about -var(w)/(2 K mean(w)^2) = -1/(2 ESS) (delta method);
    # allow 5 standard errors plus that bias
    points = result.points
    tolerance = 5 * points.iwae_stderr + 1 / (2 * points.ess)
    assert np.all(np.abs(points.iwae - exact) < tolerance), (points.iwae - exact, tolerance)
    assert result.kl_kind == MONTE_CARLO  # a mixture prior: no closed form
    assert np.all(points.ess > 100)


def test_poisson_decoder_against_its_exact_pmf(models):
    folder, module = models
    model = module.PoissonDecoder()
    rng = np.random.default_rng(6)
    w, c = rng.normal(size=4).astype(np.float32) * 0.6, (rng.normal(size=4) + 1.0).astype(np.float32)
    with torch.no_grad():
        model.w.copy_(torch.from_numpy(w))
        model.c.copy_(torch.from_numpy(c))
        model.encoder.weight.zero_()  # q(z|x) = N(0.2, 0.8): a broad proposal covering every posterior
        model.encoder.bias.copy_(torch.tensor([0.2, math.log(0.8)]))
    z = rng.standard_normal((15, 1))
    x = rng.poisson(np.exp(z * w + c)).astype(np.float32)
    np.save(folder / "x.npy", x)
    loaded, data = _load(folder, _save(model, folder, "poisson"), folder / "x.npy", "PoissonDecoder")
    samples = 4000
    result = evaluate(loaded, data, samples=samples, seed=0)
    assert result.measure == PROBABILITY  # a discrete support: log-probabilities
    with torch.no_grad():
        mean, log_var = model.encode(torch.from_numpy(x))
    m, v = mean.double().numpy(), log_var.double().exp().numpy()
    w64, c64, x64 = w.astype(np.float64), c.astype(np.float64), x.astype(np.float64)
    # E_q[log Poisson(x; exp(w z + c))] = x (w m + c) - exp(w m + c + w^2 v / 2) - log x!
    recon = (x64 * (w64 * m + c64) - np.exp(w64 * m + c64 + w64**2 * v / 2) - special.gammaln(x64 + 1)).sum(1)
    points = result.points
    # the reconstruction term is a plain Monte Carlo mean: its standard error is the recon draws' spread / sqrt(K);
    # the ELBO's error is that of recon (the KL is analytic), so recon's error is elbo_stderr
    assert np.all(np.abs(points.recon - recon) < 5 * points.elbo_stderr)
    # log p(x) by Gauss-Hermite quadrature over the one latent
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    log_lik = (x64[:, None, :] * (nodes[None, :, None] * w64 + c64) - np.exp(nodes[None, :, None] * w64 + c64)
               - special.gammaln(x64 + 1)[:, None, :]).sum(-1)
    exact = special.logsumexp(log_lik + np.log(weights / math.sqrt(2 * math.pi)), axis=1)
    assert np.all(np.abs(points.iwae - exact) < 5 * points.iwae_stderr + 1 / (2 * points.ess))
    assert np.all(points.iwae <= exact + 5 * points.iwae_stderr)


def test_data_outside_a_decoder_distributions_support_is_refused(models, tmp_path):
    folder, module = models
    weights = _save(module.PoissonDecoder(), folder, "poisson")
    np.save(folder / "bad.npy", np.array([[0, 1, 2.5, 3]], dtype=np.float32))
    result = CliRunner().invoke(main, ["elbo", str(weights), str(folder / "bad.npy"), "--arch", f"{folder / 'models.py'}:PoissonDecoder"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "element [2] is 2.5; the decode() likelihood needs non-negative integers (the support of its Poisson)" in result.stderr


def test_flow_posterior_equals_the_same_posterior_written_as_one_normal(models):
    folder, module = models
    model = module.AffineFlow()
    with torch.no_grad():
        model.shift.copy_(torch.tensor([0.3, -0.7]))
        model.log_scale.copy_(torch.tensor([0.4, -0.5]))
    x = (np.random.default_rng(7).random((10, 6)) < 0.4).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(model, folder, "flow")
    options = {"likelihood": {"family": "bernoulli"}}
    flow, data = _load(folder, weights, folder / "x.npy", "AffineFlow", **options)
    absorbed, _ = _load(folder, weights, folder / "x.npy", "Absorbed", **options)
    assert flow.general and not absorbed.general  # the absorbed form is a diagonal Normal: format 1's fast path
    a = evaluate(flow, data, samples=300, seed=3)
    b = evaluate(absorbed, data, samples=300, seed=3)
    # the same draws (the flow of the same noise), the same densities (log|det| of the flow included)
    for name in ("recon", "iwae", "ess"):
        np.testing.assert_allclose(getattr(a.points, name), getattr(b.points, name), atol=1e-4, rtol=1e-5)
    # the flow's KL has no closed form: it is the draws' mean log q - log p (and the ELBO the mean log-weight),
    # equal to the absorbed form's analytic KL within its Monte Carlo error
    assert a.kl_kind == MONTE_CARLO and b.kl_kind != MONTE_CARLO
    assert np.all(np.abs(a.points.kl - b.points.kl) < 5 * a.points.kl_stderr)
    assert np.all(np.abs(a.points.elbo - b.points.elbo) < 5 * a.points.elbo_stderr)
    np.testing.assert_allclose(a.latent_means, b.latent_means, atol=5 * np.sqrt(b.latent_vars.max() / 300))


def test_covariates_reach_encode_and_decode_giving_log_p_x_given_c(models):
    folder, module = models
    model = module.ConditionalPPCA()
    rng = np.random.default_rng(8)
    W = (rng.normal(size=(4, 2)) + 0.5).astype(np.float32)
    offsets = (rng.normal(size=(3, 4)) * 2).astype(np.float32)
    with torch.no_grad():
        model.W.copy_(torch.from_numpy(W))
        model.offsets.weight.copy_(torch.from_numpy(offsets))
    y = rng.integers(0, 3, size=11)
    x = (rng.normal(size=(11, 2)) @ W.T + offsets[y] + 0.5 * rng.normal(size=(11, 4))).astype(np.float32)
    np.savez(folder / "xy.npz", x=x, y=y)
    loaded, data = _load(folder, _save(model, folder, "conditional"), folder / "xy.npz", "ConditionalPPCA", key="x", covariates=("y",))
    result = evaluate(loaded, data, samples=5, seed=1, batch_size=4)
    exact = np.array([_ppca_log_px(x[i : i + 1].astype(np.float64), W, offsets[y[i]], 0.5) for i in range(11)])
    np.testing.assert_allclose(result.points.iwae, exact, atol=2e-4)
    # the same through the command line, the covariate named by --covariates
    out = CliRunner().invoke(main, ["elbo", str(folder / "conditional.safetensors"), str(folder / "xy.npz"), "--key", "x",
                                    "--covariates", "y", "--arch", f"{folder / 'models.py'}:ConditionalPPCA", "-k", "5",
                                    "--seed", "1", "--json"])
    assert out.exit_code == 0, out.stderr
    document = json.loads(out.stdout)
    np.testing.assert_allclose([p["iwae"] for p in document["points"]], exact, atol=2e-4)
    jsonschema.Draft202012Validator(schema("vaeeval.elbo/1")).validate(document)
    assert document["model"]["covariates"] == ["y"] and document["data"]["covariates"] == ["y"]
    assert document["model"]["prior"]["source"] == ASSUMED and ASSUMED in document["model"]["notes"]
    # the covariates are part of what was evaluated: other labels, another data digest
    np.savez(folder / "xy2.npz", x=x, y=(y + 1) % 3)
    other = CliRunner().invoke(main, ["elbo", str(folder / "conditional.safetensors"), str(folder / "xy2.npz"), "--key", "x",
                                      "--covariates", "y", "--arch", f"{folder / 'models.py'}:ConditionalPPCA", "-k", "5",
                                      "--json"])
    assert json.loads(other.stdout)["data"]["digest"] != document["data"]["digest"]
    table = CliRunner().invoke(main, ["elbo", str(folder / "conditional.safetensors"), str(folder / "xy.npz"), "--key", "x",
                                      "--covariates", "y", "--arch", f"{folder / 'models.py'}:ConditionalPPCA", "-k", "5"])
    words = " ".join(table.stdout.split())  # the table wraps long lines
    assert "note N(0, I) assumed: the model defines no prior()" in words and "D = 4 dims; given y" in words


def _general_twin(fast):
    """The same diagonal model, forced through the general path (its posterior and N(0, I) as distributions)."""
    encoder = fast.encoder
    probe = as_posterior(encoder.call(torch.zeros(2, *fast.input_shape)), "encode", 2)
    return ArchModel(
        **{name: getattr(fast, name) for name in ("encoder", "decoder", "likelihood", "input_shape", "latent_dim")},
        prior=standard_normal(fast.latent_dim, probe),
        general=True,
        posterior_of=lambda x, c: as_posterior(encoder.call(x, c), "encode", x.shape[0]),
        decode_of=fast.decoder.call,
    )


def test_general_path_equals_the_fast_path_on_the_same_diagonal_model(models):
    """The same diagonal model through both paths: the same draws, the same numbers, whatever the batching."""
    folder, module = models
    x = (np.random.default_rng(9).random((70, 6)) < 0.4).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(module.AffineFlow(), folder, "flow")
    fast, data = _load(folder, weights, folder / "x.npy", "Plain", likelihood={"family": "bernoulli"})
    assert not fast.general
    general = _general_twin(fast)
    for batch_size, samples in ((32, 100), (7, 33)):
        a = evaluate(fast, data, samples=samples, seed=11, batch_size=batch_size)
        b = evaluate(general, data, samples=samples, seed=11, batch_size=batch_size)
        for name in ("elbo", "recon", "kl", "iwae", "iwae_stderr", "ess", "khat"):
            np.testing.assert_allclose(getattr(b.points, name), getattr(a.points, name), rtol=1e-9, atol=1e-9, err_msg=name)


def _ppca_model(models, name="FullCovariancePPCA", points=6):
    folder, module = models
    model = getattr(module, name)()
    W, b = _non_orthogonal(5, 3, seed=1)
    with torch.no_grad():
        model.W.copy_(torch.from_numpy(W))
        model.b.copy_(torch.from_numpy(b))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(points, 3)) @ W.T + b + 0.4 * rng.normal(size=(points, 5))
    np.save(folder / "x.npy", x.astype(np.float32))
    loaded, data = _load(folder, _save(model, folder, name), folder / "x.npy", name)
    return loaded, data, _ppca_log_px(data.array.astype(np.float64), W, b, 0.4)


def test_ais_from_an_exact_full_covariance_posterior_is_log_px(models):
    """Started at the exact posterior, every annealing distribution is the posterior: every weight is p(x)."""
    loaded, data, exact = _ppca_model(models)
    result = evaluate_ais(loaded, data, steps=20, leapfrog=3, chains=4, samples=10, seed=1, init="encoder")
    np.testing.assert_allclose(result.points.ais, exact, atol=2e-4)
    assert np.all(result.points.acceptance > 0.5)


def test_ais_from_the_prior_through_a_mixture_prior_against_its_closed_form(models):
    folder, module = models
    model = module.MixturePrior()
    rng = np.random.default_rng(4)
    with torch.no_grad():
        model.W.copy_(torch.from_numpy(rng.normal(size=(3, 2)).astype(np.float32)))
        model.means.copy_(torch.from_numpy((rng.normal(size=(3, 2)) * 1.5).astype(np.float32)))
        model.log_scales.fill_(-0.5)
    x = (rng.normal(size=(4, 3)) * 2).astype(np.float32)
    np.save(folder / "x.npy", x)
    loaded, data = _load(folder, _save(model, folder, "mixture"), folder / "x.npy", "MixturePrior")
    result = evaluate_ais(loaded, data, steps=200, leapfrog=5, chains=16, init="prior", samples=10, seed=2)
    p = {name: getattr(model, name).detach().double().numpy() for name in ("W", "b", "logits", "means", "log_scales")}
    exact = _mixture_log_px(x.astype(np.float64), p["W"], p["b"], 0.5, p["logits"], p["means"], np.exp(p["log_scales"]))
    # AIS is unbiased for p(x); its log is within a few standard errors plus the delta-method bias 1/(2 ESS)
    points = result.points
    assert np.all(np.abs(points.ais - exact) < 5 * points.ais_stderr + 1 / (2 * points.ess) + 1e-3), (points.ais - exact)


def test_ais_through_the_general_path_equals_the_fast_path(models):
    folder, module = models
    x = (np.random.default_rng(9).random((5, 6)) < 0.4).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(module.AffineFlow(), folder, "flow")
    fast, data = _load(folder, weights, folder / "x.npy", "Plain", likelihood={"family": "bernoulli"})
    general = _general_twin(fast)
    for init in ("encoder", "prior"):
        a = evaluate_ais(fast, data, steps=12, leapfrog=4, chains=3, init=init, samples=10, seed=4)
        b = evaluate_ais(general, data, steps=12, leapfrog=4, chains=3, init=init, samples=10, seed=4)
        np.testing.assert_allclose(b.points.ais, a.points.ais, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(b.points.step_size, a.points.step_size, rtol=1e-6)


def test_a_flow_without_an_inverse_evaluates_but_ais_from_it_is_refused_naming_the_fix(models):
    folder, module = models
    x = (np.random.default_rng(10).random((4, 6)) < 0.4).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(module.OneWayFlow(), folder, "oneway")
    arch = ["--arch", f"{folder / 'models.py'}:OneWayFlow", "--likelihood", "bernoulli"]
    ok = CliRunner().invoke(main, ["elbo", str(weights), str(folder / "x.npy"), "-k", "50", "--json", *arch])
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["summary"]["kl_kind"] == MONTE_CARLO  # log q of its own draws: the cached inverse
    refused = CliRunner().invoke(main, ["ais", str(weights), str(folder / "x.npy"), "--steps", "3", "--chains", "2", *arch])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "TransformedDistribution.log_prob raised NotImplementedError" in refused.stderr and "--init prior" in refused.stderr
    from_prior = CliRunner().invoke(main, ["ais", str(weights), str(folder / "x.npy"), "--steps", "3", "--chains", "2",
                                           "--init", "prior", "-k", "10", *arch])
    assert from_prior.exit_code == 0, from_prior.stderr


def test_bdmc_simulates_from_a_decoder_distribution_and_brackets_log_px(models):
    folder, module = models
    model = module.PoissonDecoder()
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.5, -0.3, 0.8, 0.2]))
        model.c.copy_(torch.tensor([1.0, 0.5, 0.2, 1.5]))
        model.encoder.weight.zero_()
    np.save(folder / "x.npy", np.zeros((2, 4), dtype=np.float32))
    loaded, _ = _load(folder, _save(model, folder, "poisson"), folder / "x.npy", "PoissonDecoder")
    evaluation, simulated = run_bdmc(loaded, 6, AISOptions(steps=100, leapfrog=5, chains=8), EvaluationOptions(samples=50, seed=3))
    assert simulated.x.shape == (6, 4) and np.all(simulated.x == np.round(simulated.x)) and simulated.x.min() >= 0
    again, _ = run_bdmc(loaded, 6, AISOptions(steps=100, leapfrog=5, chains=8), EvaluationOptions(samples=50, seed=3))
    np.testing.assert_array_equal(again.points.lower, evaluation.points.lower)  # reproducible, the draws keyed by seed
    # the forward bound is AIS on the simulated points, whose standard errors measure both bounds' noise here
    ais = evaluate_ais(loaded, simulated.x, steps=100, leapfrog=5, chains=8, samples=50, seed=3).points
    np.testing.assert_allclose(evaluation.points.lower, ais.ais, rtol=1e-12)
    w, c, x = model.w.detach().double().numpy(), model.c.detach().double().numpy(), simulated.x.astype(np.float64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    rates = nodes[None, :, None] * w + c
    exact = special.logsumexp((x[:, None] * rates - np.exp(rates) - special.gammaln(x + 1)[:, None]).sum(-1)
                              + np.log(weights / math.sqrt(2 * math.pi)), axis=1)
    tolerance = 5 * ais.ais_stderr + 1 / (2 * ais.ess)
    assert np.all(np.abs(evaluation.points.lower - exact) < tolerance)
    assert np.all(np.abs(evaluation.points.upper - exact) < tolerance)


def test_bdmc_of_a_conditional_model_is_refused(models):
    folder, module = models
    rng = np.random.default_rng(8)
    np.savez(folder / "xy.npz", x=rng.normal(size=(3, 4)).astype(np.float32), y=np.array([0, 1, 2]))
    weights = _save(module.ConditionalPPCA(), folder, "conditional")
    result = CliRunner().invoke(main, ["bdmc", str(weights), "--n", "3", "--arch", f"{folder / 'models.py'}:ConditionalPPCA",
                                       "--covariates", "y", "--input-shape", "4"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(
    ("case", "arrays", "args", "phrase"),
    [
        ("a name the .npz lacks", {"x": 4, "y": 4}, ["--covariates", "batch"], "has no array 'batch'; it holds x, y"),
        ("fewer rows than points", {"x": 4, "y": 3}, ["--covariates", "y"], "covariate 'y' has 3 rows; the data has 4 points"),
        ("not a keyword", {"x": 4, "y": 4}, ["--covariates", "y,2b"], "'2b' is not a name a keyword argument can have"),
        ("named twice", {"x": 4, "y": 4}, ["--covariates", "y,y"], "names a covariate twice"),
        ("the data itself", {"x": 4, "y": 4}, ["--covariates", "x"], "is the data array itself"),
        ("without --arch", {"x": 4, "y": 4}, ["--covariates", "y", "--no-arch"], "--covariates goes with --arch"),
        ("not finite", {"x": 4, "y": "nan"}, ["--covariates", "y"], "covariate 'y' of point 1 is nan"),
        ("a model not taking it", {"x": 4, "y": 4}, ["--covariates", "y", "--class", "PoissonDecoder"],
         "encode(x) raised TypeError"),
    ],
)
def test_bad_covariates_are_one_line_exit_2(models, case, arrays, args, phrase):
    folder, module = models
    weights = _save(module.ConditionalPPCA(), folder, "conditional")
    rng = np.random.default_rng(0)
    found = {"x": rng.normal(size=(arrays["x"], 4)).astype(np.float32)}
    if arrays["y"] == "nan":
        found["y"] = np.array([0.0, np.nan, 1.0, 2.0])
    else:
        found["y"] = rng.integers(0, 3, size=arrays["y"])
    np.savez(folder / "xy.npz", **found)
    name = args[args.index("--class") + 1] if "--class" in args else "ConditionalPPCA"
    if "--class" in args:
        weights = _save(getattr(module, name)(), folder, name)
    extra = [a for i, a in enumerate(args) if a not in ("--class", "--no-arch") and (i == 0 or args[i - 1] != "--class")]
    arch = [] if "--no-arch" in args else ["--arch", f"{folder / 'models.py'}:{name}"]
    result = CliRunner().invoke(main, ["elbo", str(weights), str(folder / "xy.npz"), "--key", "x", "-k", "4", *arch, *extra])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, (case, result.stderr, result.exception)
    assert phrase in result.stderr, (case, result.stderr)


@pytest.mark.parametrize(
    ("name", "extra", "phrase"),
    [
        ("PriorTensor", [], "prior() returned a tensor [1]; vaeeval needs a torch.distributions.Distribution over z"),
        ("PriorShape", [], "prior() returned Independent(Normal) with batch shape [] and event shape [3]; vaeeval needs batch [] "),
        ("DecodeShape", [], "decode(z) returned Poisson of shape [2, 3] for 2 latent vectors; vaeeval needs one data point (4 values)"),
        ("EncodeShape", [], "encode(x) returned Independent(Normal) with batch shape [3] and event shape [1] for 2 points"),
        ("PoissonDecoder", ["--likelihood", "gaussian"], "decode(z) returns Poisson, which is the likelihood itself"),
    ],
)
def test_protocol_mistakes_are_one_line_exit_2(models, name, extra, phrase):
    folder, module = models
    weights = _save(getattr(module, name)(), folder, name)
    np.save(folder / "counts.npy", np.ones((3, 4), dtype=np.float32))
    arch = f"{folder / 'models.py'}:{name}"
    result = CliRunner().invoke(main, ["elbo", str(weights), str(folder / "counts.npy"), "--arch", arch, *extra])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, (result.stderr, result.exception)
    assert phrase in result.stderr, result.stderr


def test_a_normal_from_decode_is_binned_exactly_in_both_tails_like_format_1(models):
    """Bins 10 to 60 sigma from the decoder's mean: the distribution's bins equal format 1's Gaussian,
    point by point, on the same draws (the old float32 cdf difference floored every such bin at -87.3)."""
    folder, module = models
    rng = np.random.default_rng(4)
    x = rng.choice([0.0, 1.0, 40 / 255, 200 / 255], size=(12, 6)).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(module.NormalDecode(), folder, "normal")
    own, data = _load(folder, weights, folder / "x.npy", "NormalDecode")
    gaussian, _ = _load(folder, weights, folder / "x.npy", "MeanDecode", likelihood={"family": "gaussian", "sigma": 2**-7})
    a = evaluate(own, data, samples=16, seed=3)
    b = evaluate(gaussian, data, samples=16, seed=3)
    assert a.measure == b.measure == PROBABILITY
    # the two paths run the decoder on different batches, so its float32 means may differ in the last bit: 60
    # scales out (d log P / d mean = 60 / 2**-7 per unit) one ulp of a mean moves a value's log-probability by
    # up to ~1e-7 of itself, and a point sums six; the floor this test guards against was off by hundreds of nats
    for name in ("elbo", "recon", "iwae"):
        np.testing.assert_allclose(getattr(a.points, name), getattr(b.points, name), rtol=1e-6, err_msg=name)
    assert a.points.recon.min() < -87.4 * 6  # far below what the float32 floor allowed

    from vaeeval.user.distributions import log_prob_of  # on the same means: the same bins to float64 rounding

    means = torch.as_tensor(rng.random((5, 6)), dtype=torch.float32)
    values = torch.as_tensor(rng.choice([0.0, 1.0, 40 / 255, 200 / 255], size=(5, 6)), dtype=torch.float32)
    own_bins = log_prob_of(Independent(Normal(means, 2**-7), 1), values, Grid(256))
    format_bins = gaussian.likelihood.log_prob(means[:, None], values, Grid(256))
    np.testing.assert_allclose(own_bins.numpy(), format_bins.numpy(), rtol=1e-12)


def test_any_decode_distribution_with_a_cdf_is_binned_exactly_in_both_tails(models):
    """A Normal subclass (not in vaeeval's table of exact families: its bins come from its own cdf, and from its
    density integrated over the bin where the cdf cannot resolve them) gives the exact path's numbers, point by
    point, on data 10 to 60 scales from the decoder's mean; no note of a floor, since none is left."""
    folder, module = models
    x = np.random.default_rng(4).choice([0.0, 1.0, 40 / 255, 200 / 255], size=(12, 6)).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(module.NormalDecode(), folder, "normal")
    exact, data = _load(folder, weights, folder / "x.npy", "NormalDecode")
    own, _ = _load(folder, weights, folder / "x.npy", "OwnNormalDecode")
    assert not [note for note in own.notes if "floor" in note]
    a, b = evaluate(own, data, samples=16, seed=3), evaluate(exact, data, samples=16, seed=3)
    assert a.points.recon.min() < -87.4 * 6
    for name in ("elbo", "recon", "iwae"):  # two float64 formulas of tails near -3000 nats a value
        np.testing.assert_allclose(getattr(a.points, name), getattr(b.points, name), rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("grid", [True, False])
def test_explain_writes_a_decode_normal_out_as_the_gaussian_with_the_decoders_own_sigma(models, grid):
    """--explain on the general path: decode() returning Normal(mean, 2**-7) is split as a Gaussian with sigma_d(z);
    its statistics, redrawn through keyed_sample, equal format 1's Gaussian of the same means (--likelihood gaussian
    --sigma 2**-7, format 1's draws), and its terms add up to recon."""
    from vaeeval.estimators.importance.evaluate import Evaluator
    from vaeeval.estimators.importance.explain import explain
    from vaeeval.results.recon_terms import recon_terms
    from vaeeval.results.records import model_record

    folder, module = models
    rng = np.random.default_rng(5)
    x = (rng.integers(0, 256, size=(9, 6)) / 255 if grid else rng.normal(0.5, 0.01, size=(9, 6))).astype(np.float32)
    np.save(folder / "x.npy", x)
    weights = _save(module.NormalDecode(), folder, "normal")
    found = {}
    for name, options in (("NormalDecode", {}), ("MeanDecode", {"likelihood": {"family": "gaussian", "sigma": 2**-7}})):
        model, data = _load(folder, weights, folder / "x.npy", name, **options)
        evaluator = Evaluator(model, data, EvaluationOptions(samples=16, seed=3, batch_size=4))
        evaluation = evaluator.evaluate()
        record = model_record(model)
        statistics = explain(evaluator, evaluation, record)
        found[name] = (model.general, evaluation, statistics, recon_terms(evaluation.points.recon, record, evaluation.scoring, statistics))
    general, evaluation, statistics, terms = found["NormalDecode"]
    assert general and not found["MeanDecode"][0]
    assert terms["family"] == "gaussian" and terms["terms"] is not None
    total = sum(np.array(terms["points"].get(t["name"], t["mean"])) for t in terms["terms"])
    np.testing.assert_allclose(total, evaluation.points.recon, rtol=1e-12)
    reference = found["MeanDecode"][2]
    if grid:  # the format-1 path needs the pass on bins too: the same statistics from its own draws
        for key in ("loss", "log_density_width"):
            np.testing.assert_allclose(statistics.values[key], reference.values[key], rtol=1e-6, err_msg=key)
    else:  # a fixed sigma is split without the pass: its SSE is recon minus the constants
        np.testing.assert_allclose(terms["points"]["-E[sum_d (x_d - mu_d)^2 / (2 sigma_d^2)]"],
                                   np.array(found["MeanDecode"][3]["points"]["-E[SSE]/(2 sigma^2)"]), rtol=1e-5)
        np.testing.assert_allclose(statistics.values["log_scale"], 6 * math.log(2**-7), rtol=1e-12)


def _mixture_bin_reference(x, weights, means, scales, levels):
    """log P(bin of x) of a mixture of Normals, by mpmath at 50 digits."""
    import mpmath

    mpmath.mp.dps = 50
    k = round(x * (levels - 1))
    lo = -mpmath.inf if k <= 0 else mpmath.mpf(x) - mpmath.mpf(0.5) / (levels - 1)
    hi = mpmath.inf if k >= levels - 1 else mpmath.mpf(x) + mpmath.mpf(0.5) / (levels - 1)
    total = mpmath.mpf(0)
    root2 = mpmath.sqrt(2)
    for w, m, s in zip(weights, means, scales, strict=True):
        a, b = (lo - m) / s, (hi - m) / s
        if a + b > 0:  # upper tail: P = (erfc(a/√2) - erfc(b/√2)) / 2, no 1 - tiny
            mass = (mpmath.erfc(a / root2) - mpmath.erfc(b / root2)) / 2
        else:
            mass = (mpmath.erfc(-b / root2) - mpmath.erfc(-a / root2)) / 2
        total += mpmath.mpf(w) * mass
    return float(mpmath.log(total))


def test_a_per_value_mixture_of_normals_is_binned_exactly_in_both_tails():
    from vaeeval.user.distributions import log_prob_of

    levels = 256
    logits = torch.tensor([[[0.3, -1.0, 0.2], [2.0, 0.0, -3.0], [0.0, 0.0, 0.0], [1.0, 1.0, -1.0]]], dtype=torch.float64)
    means = torch.tensor([[[0.1, 0.5, 0.9], [0.5, 0.52, 0.48], [0.0, 0.2, 0.4], [0.95, 0.97, 0.99]]], dtype=torch.float64)
    scales = torch.tensor([[[0.01, 0.02, 0.005], [0.003, 0.004, 0.01], [0.02, 0.02, 0.02], [0.001, 0.002, 0.003]]], dtype=torch.float64)
    x = torch.tensor([[200 / 255, 1.0, 0.0, 3 / 255]], dtype=torch.float64)  # tens to hundreds of scales from every mean
    mixture = Independent(MixtureSameFamily(Categorical(logits=logits), Normal(means, scales)), 1)
    found = log_prob_of(mixture, x, Grid(levels)).item()
    weights = torch.softmax(logits, -1)[0]
    expected = sum(_mixture_bin_reference(x[0, d].item(), weights[d].tolist(), means[0, d].tolist(), scales[0, d].tolist(), levels)
                   for d in range(4))
    assert found == pytest.approx(expected, rel=1e-6)
    assert expected < -1000  # deep in the tails, where a float32 cdf difference is 0

