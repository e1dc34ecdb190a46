"""Count data: the Poisson, negative binomial and ZINB families against mpmath and scipy; format 1's
covariates, batch norm, log1p, variance floor and library sizes against an independent numpy model,
with the ELBO's terms and log p(x) exact by quadrature."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from conftest import cli
from safetensors.torch import save_file
from scipy import stats
from scipy.special import log_softmax, logsumexp

from vaeeval import evaluate, load_model
from vaeeval.estimators.annealing.ais import evaluate_ais
from vaeeval.format.data import Dataset
from vaeeval.format.domains import detect_domain
from vaeeval.format.likelihoods import likelihood_from_spec

# ---------------------------------------------------------------- the families


def _mp_log_pmf(family: str, x: float, mu: float, theta: float, logit: float) -> float:
    """The log-pmf at 50 digits (mpmath), scVI's (mu, theta) negative binomial."""
    with mpmath.workdps(50):
        x, mu, theta, logit = (mpmath.mpf(v) for v in (x, mu, theta, logit))
        if family == "poisson":
            return float(x * mpmath.log(mu) - mu - mpmath.loggamma(x + 1))
        nb = (mpmath.loggamma(x + theta) - mpmath.loggamma(theta) - mpmath.loggamma(x + 1)
              + theta * mpmath.log(theta / (theta + mu)) + x * mpmath.log(mu / (theta + mu)))
        if family == "negative_binomial":
            return float(nb)
        pi = 1 / (1 + mpmath.exp(-logit))
        return float(mpmath.log(pi + (1 - pi) * mpmath.exp(nb)) if x == 0 else mpmath.log(1 - pi) + nb)


EXTREMES = [  # (x, mu, theta, zero-inflation logit): huge counts, tiny and huge theta, tiny and huge mu
    (0, 3.0, 2.0, 0.0), (1, 3.0, 2.0, -2.0), (7, 0.5, 0.1, 3.0), (0, 1e-6, 1e-8, -30.0), (5, 1e-6, 1e-8, 30.0),
    (1e6, 1e6, 1e-8, 1.0), (1e6, 9.9e5, 1e9, -1.0), (1e8, 1e8, 50.0, 0.5), (3, 2.0, 1e12, 0.0), (0, 500.0, 1e-3, -5.0),
    (0, 1e4, 1e4, 10.0), (40, 1e-3, 0.5, -10.0), (2, 1e15, 1e-5, 0.0),
]


@pytest.mark.parametrize("family", ["poisson", "negative_binomial", "zinb"])
def test_count_families_match_50_digit_references_to_1e_6_relative(family):
    """lgamma forms exact for huge counts, tiny and huge theta (the Poisson limit), tiny and huge means."""
    x, mu, theta, logit = (torch.tensor(column, dtype=torch.float64) for column in zip(*EXTREMES, strict=True))
    blocks = {"poisson": [mu.log()], "negative_binomial": [mu.log(), theta.log()], "zinb": [mu.log(), theta.log(), logit]}
    likelihood = likelihood_from_spec({"family": family}, {}, (len(EXTREMES),))
    found = likelihood.elementwise_log_prob(torch.stack(blocks[family])[None], x[None])[0].numpy()
    expected = np.array([_mp_log_pmf(family, *case) for case in EXTREMES])
    np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("family", ["poisson", "negative_binomial", "zinb"])
def test_count_families_match_scipy_on_a_grid_and_sum_over_dimensions(family):
    rng = np.random.default_rng(0)
    points, dims = 7, 30
    log_mu = rng.normal(1.0, 2.0, (points, dims))
    log_theta = rng.normal(0.0, 1.5, dims)
    logits = rng.normal(0.0, 2.0, (points, dims))
    x = rng.poisson(np.exp(log_mu) * rng.gamma(1.0, 1.0, (points, dims))).astype(np.float64)
    x[:, :3] = 0
    mu, theta = np.exp(log_mu), np.exp(log_theta)
    if family == "poisson":
        expected, spec, params = stats.poisson.logpmf(x, mu), {"family": family}, [log_mu]
        tensors = {}
    else:
        nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
        pi = 1 / (1 + np.exp(-logits))
        expected = nb if family == "negative_binomial" else np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb)
        spec, tensors = {"family": family, "log_theta": "theta"}, {"theta": torch.tensor(log_theta, dtype=torch.float32)}
        params = [log_mu] if family == "negative_binomial" else [log_mu, logits]
        log_theta = log_theta.astype(np.float32).astype(np.float64)  # the file holds float32
        theta = np.exp(log_theta)
        nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
        expected = nb if family == "negative_binomial" else np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb)
    likelihood = likelihood_from_spec(spec, tensors, (dims,))
    assert likelihood.measure == "probability" and likelihood.params_per_dim == len(params)
    found = likelihood.log_prob(torch.tensor(np.stack(params, axis=1)), torch.tensor(x))
    np.testing.assert_allclose(found.numpy(), expected.sum(axis=1), rtol=1e-9)


def test_count_families_refuse_what_is_not_a_count():
    likelihood = likelihood_from_spec({"family": "poisson"}, {}, (4,))
    assert likelihood.outside_support(np.array([0.0, 3.0, 2.5, -1.0])).tolist() == [False, False, True, True]


# ---------------------------------------------------------------- a count VAE, exact by quadrature

GENES, HIDDEN, BATCHES = 5, 6, ("a", "b")
FLOOR = 1e-4


def _count_document(family: str, library: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """A scVI-shaped VAE with a 1-D z: log1p, a linear layer taking the one-hot batch, batch norm, tanh, heads."""
    rng = np.random.default_rng(seed)

    def tensor(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return torch.tensor(rng.normal(0.0, scale, shape), dtype=torch.float32)

    P = {"poisson": 1, "negative_binomial": 1, "zinb": 2}[family]
    t = {
        "enc.0.weight": tensor(HIDDEN, GENES + 2), "enc.0.bias": tensor(HIDDEN),
        "enc.1.running_mean": tensor(HIDDEN), "enc.1.running_var": tensor(HIDDEN).abs() + 0.5,
        "enc.1.weight": tensor(HIDDEN) + 1, "enc.1.bias": tensor(HIDDEN),
        "enc.3.weight": tensor(2, HIDDEN), "enc.3.bias": torch.tensor([0.0, -1.0]),
        "dec.0.weight": tensor(P * GENES, 1 + 2, scale=0.8), "dec.0.bias": tensor(P * GENES),
    }
    document = {
        "format": 1, "input_shape": [GENES], "latent_dim": 1,
        "covariates": [{"name": "batch", "categories": list(BATCHES)}],
        "encoder": [{"type": "log1p"}, {"type": "linear", "tensor": "enc.0", "covariates": ["batch"]},
                    {"type": "batch_norm", "tensor": "enc.1", "eps": 1e-3}, {"type": "tanh"}, {"type": "linear", "tensor": "enc.3"}],
        "decoder": [{"type": "linear", "tensor": "dec.0", "covariates": ["batch"]}],
        "likelihood": {"family": family}, "posterior": {"variance_floor": FLOOR}, "data": {"domain": "counts"},
    }
    if family != "poisson":
        t["theta"] = tensor(GENES, scale=1.0)
        document["likelihood"]["log_theta"] = "theta"
    if library == "observed":
        document["library"] = {"type": "observed"}
    else:
        t.update({"lib.0.weight": tensor(2, GENES + 2, scale=0.2), "lib.0.bias": torch.tensor([3.0, -3.0]),
                  "lib.mean": torch.tensor([3.0, 3.5]), "lib.log_var": torch.tensor([math.log(0.25), math.log(0.16)])})
        document["library"] = {"type": "latent", "encoder": [{"type": "log1p"}, {"type": "linear", "tensor": "lib.0",
                                                                                  "covariates": ["batch"]}],
                               "mean": "lib.mean", "log_var": "lib.log_var", "covariate": "batch"}
    return document, t


def _write(path: Path, document: dict, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"vaeeval": json.dumps(document)})
    return path


class Reference:
    """The same model in float64 numpy, written from the document's words alone."""

    def __init__(self, document: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.d, self.t = document, {name: value.double().numpy() for name, value in tensors.items()}
        self.family, self.library = document["likelihood"]["family"], document["library"]["type"]

    def _linear(self, name: str, features: np.ndarray, batch: np.ndarray) -> np.ndarray:
        given = np.concatenate([features, np.eye(2)[batch]], axis=-1)
        return given @ self.t[f"{name}.weight"].T + self.t[f"{name}.bias"]

    def posterior(self, x: np.ndarray, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q's means and variances of (z, log library) ``[N, 1 or 2]``."""
        h = self._linear("enc.0", np.log1p(x), batch)
        h = (h - self.t["enc.1.running_mean"]) / np.sqrt(self.t["enc.1.running_var"] + 1e-3) * self.t["enc.1.weight"] + self.t["enc.1.bias"]
        out = np.tanh(h) @ self.t["enc.3.weight"].T + self.t["enc.3.bias"]
        means, variances = out[:, :1], np.exp(out[:, 1:]) + FLOOR
        if self.library == "latent":
            own = self._linear("lib.0", np.log1p(x), batch)
            means, variances = np.hstack([means, own[:, :1]]), np.hstack([variances, np.exp(own[:, 1:]) + FLOOR])
        return means, variances

    def log_lik(self, x: np.ndarray, batch: np.ndarray, z: np.ndarray, log_library: np.ndarray) -> np.ndarray:
        """log p(x | z, library) for one point at many (z, l): ``z``, ``log_library`` ``[M]``."""
        out = self._linear("dec.0", z[:, None], np.full(z.shape, batch))
        log_mu = log_softmax(out[:, :GENES], axis=1) + log_library[:, None]
        mu = np.exp(log_mu)
        if self.family == "poisson":
            return stats.poisson.logpmf(x, mu).sum(axis=1)
        theta = np.exp(self.t["theta"])
        nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
        if self.family == "negative_binomial":
            return nb.sum(axis=1)
        pi = 1 / (1 + np.exp(-out[:, GENES:]))
        return np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log1p(-pi) + nb).sum(axis=1)

    def library_prior(self, batch: int) -> tuple[float, float]:
        return self.t["lib.mean"][batch], math.exp(self.t["lib.log_var"][batch])

    def exact(self, x: np.ndarray, batch: np.ndarray, nodes: int = 80) -> dict[str, np.ndarray]:
        """E_q[log p(x|z, l)] by Gauss-Hermite quadrature under q, KL(q || p) in closed form, log p(x) on a grid."""
        means, variances = self.posterior(x, batch)
        t, w = np.polynomial.hermite_e.hermegauss(nodes)
        w = w / w.sum()
        recon, kl, log_px = [], [], []
        for i in range(len(x)):
            m, v = means[i], variances[i]
            kl_i = 0.5 * (v[0] + m[0] ** 2 - 1 - math.log(v[0]))
            if self.library == "latent":
                pm, pv = self.library_prior(batch[i])
                kl_i += 0.5 * (v[1] / pv + (m[1] - pm) ** 2 / pv - 1 - math.log(v[1] / pv))
                zz, ll = np.meshgrid(m[0] + math.sqrt(v[0]) * t, m[1] + math.sqrt(v[1]) * t, indexing="ij")
                weights = np.outer(w, w).ravel()
                z, library = zz.ravel(), ll.ravel()
            else:
                z, weights = m[0] + math.sqrt(v[0]) * t, w
                library = np.full(z.shape, math.log(x[i].sum()))
            lik = self.log_lik(x[i], batch[i], z, library)
            recon.append(np.sum(weights * lik))
            kl.append(kl_i)
            log_px.append(self._log_px(x[i], batch[i]))
        return {"recon": np.array(recon), "kl": np.array(kl), "log_px": np.array(log_px)}

    def _log_px(self, x: np.ndarray, batch: int) -> float:
        """log p(x) on a fine grid over the prior (q may be far from the posterior: no importance sampling)."""
        z = np.linspace(-9.0, 9.0, 3601 if self.library == "observed" else 721)
        if self.library == "observed":
            return logsumexp(self.log_lik(x, batch, z, np.full(z.shape, math.log(x.sum()))) + stats.norm.logpdf(z)) + math.log(z[1] - z[0])
        pm, pv = self.library_prior(batch)
        library = pm + math.sqrt(pv) * np.linspace(-9.0, 9.0, 721)
        zz, ll = (grid.ravel() for grid in np.meshgrid(z, library, indexing="ij"))
        joint = self.log_lik(x, batch, zz, ll) + stats.norm.logpdf(zz) + stats.norm.logpdf(ll, pm, math.sqrt(pv))
        return logsumexp(joint) + math.log(z[1] - z[0]) + math.log(library[1] - library[0])


def _cells(points: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(2.0, 3.0, (points, GENES))).astype(np.float32)
    x[:, 0] += 1
    return x, np.arange(points) % 2


CASES = [(family, library) for family in ("poisson", "negative_binomial", "zinb") for library in ("observed", "latent")]


@pytest.mark.parametrize(("family", "library"), CASES, ids=[f"{f}-{lib}" for f, lib in CASES])
def test_a_count_vae_gives_the_exact_kl_and_its_elbo_within_error(tmp_path, family, library):
    """The KL (z's and the latent library's) is exact; the reconstruction term is E_q[log p(x|z, l)] within
    4 standard errors; IWAE is within its error of log p(x) where k-hat trusts it, and flagged where it is not."""
    document, tensors = _count_document(family, library)
    model = load_model(_write(tmp_path / "m.safetensors", document, tensors))
    assert model.latent_dim == (2 if library == "latent" else 1) and model.covariates == ("batch",)
    x, batch = _cells()
    exact = Reference(document, tensors).exact(x.astype(np.float64), batch)
    data = Dataset(x, total=len(x), domain=detect_domain(x), covariates={"batch": batch})
    result = evaluate(model, data, samples=4000, seed=3).points
    np.testing.assert_allclose(result.kl, exact["kl"], rtol=2e-5, atol=1e-6)
    assert np.all(np.abs(result.recon - exact["recon"]) < 4 * result.elbo_stderr + 1e-4), (result.recon, exact["recon"])
    # This random encoder is far from the posterior, so the weights are heavy-tailed: where IWAE misses log p(x)
    # by over a nat, either way, k-hat must flag the point; where it does not, IWAE is within its error.
    missed = np.abs(result.iwae - exact["log_px"]) > 1.0
    assert np.all(result.unreliable[missed]), (result.iwae, exact["log_px"], result.khat)
    reliable = ~result.unreliable
    assert np.all(np.abs(result.iwae - exact["log_px"])[reliable] < 4 * result.iwae_stderr[reliable] + 0.05)


@pytest.mark.parametrize("library", ["observed", "latent"])
def test_ais_on_a_conditional_count_model_reaches_log_px(tmp_path, library):
    """AIS through the covariates and the library: log p(x | batch) within its error of the quadrature."""
    document, tensors = _count_document("zinb", library)
    model = load_model(_write(tmp_path / "m.safetensors", document, tensors))
    x, batch = _cells(4)
    truth = Reference(document, tensors).exact(x.astype(np.float64), batch)["log_px"]
    data = Dataset(x, total=len(x), domain=detect_domain(x), covariates={"batch": batch})
    result = evaluate_ais(model, data, steps=100, leapfrog=5, chains=32, samples=100, seed=2).points
    error = np.mean(result.ais + result.ais_stderr**2 / 2 - truth)
    assert abs(error) < 4 * math.sqrt(np.sum(result.ais_stderr**2)) / len(truth) + 2e-3, (result.ais, truth)


def test_the_observed_library_is_each_points_total_count(tmp_path):
    """log p(x | library) with mu = sum(x) softmax(logits); a cell without counts has probability 1."""
    likelihood = likelihood_from_spec({"family": "poisson"}, {}, (4,))
    likelihood.observed_library = True
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0], [0.3, -1.0, 2.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([[3.0, 0.0, 9.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    found = likelihood.log_prob(logits[:, None], x).numpy()
    mu = 13 * np.exp(log_softmax(logits[0].numpy()))
    assert found[0] == pytest.approx(stats.poisson.logpmf(x[0].numpy(), mu).sum(), rel=1e-12)
    assert found[1] == pytest.approx(0.0, abs=1e-12)


def test_covariates_reach_the_model_by_name_and_the_output_says_what_it_is(tmp_path):
    document, tensors = _count_document("zinb", "observed")
    path = _write(tmp_path / "m.safetensors", document, tensors)
    x, batch = _cells()
    np.savez(tmp_path / "cells.npz", counts=x, batch=batch)
    out = json.loads(cli("elbo", path, tmp_path / "cells.npz", "--key", "counts", "-k", "50", "--json").stdout)
    assert out["model"]["covariates"] == ["batch"] and out["data"]["covariates"] == ["batch"]
    assert any("log p(x | library size)" in note for note in out["model"]["notes"])
    assert out["data"]["domain"] == {"domain": "counts"}
    np.savez(tmp_path / "other.npz", counts=x, batch=1 - batch)
    flipped = json.loads(cli("elbo", path, tmp_path / "other.npz", "--key", "counts", "-k", "50", "--json").stdout)
    assert flipped["summary"]["elbo"]["mean"] != out["summary"]["elbo"]["mean"]  # the batch matters


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d, t: d["library"].update(type="sampled"), "library must be"),
        (lambda d, t: d.update(likelihood={"family": "bernoulli"}), "a library size scales the mean of a count family"),
        (lambda d, t: d["decoder"][0].update(covariates=["donor"]), "takes covariate 'donor', which the document"),
        (lambda d, t: d["covariates"][0].update(categories=["a", "a"]), "categories must be a non-empty list of distinct strings"),
        (lambda d, t: d.update(posterior={"variance_floor": -1}), "variance_floor must be a non-negative number"),
        (lambda d, t: t.update({"theta": torch.zeros(3)}), "expected [] or [5]"),
        (lambda d, t: t.update({"enc.1.running_var": -torch.ones(HIDDEN)}), "negative variances"),
        (lambda d, t: d["encoder"].pop(0) and t.update({"enc.0.weight": torch.zeros(HIDDEN, GENES)}), "+ 2 of covariates batch"),
    ],
)
def test_bad_count_documents_are_one_line_exit_2(tmp_path, edit, phrase):
    document, tensors = _count_document("negative_binomial", "observed")
    edit(document, tensors)
    path = _write(tmp_path / "m.safetensors", document, tensors)
    result = cli("inspect", path, code=2)
    assert result.stderr.count("\n") == 1 and phrase in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        ({"counts": np.full((3, GENES), 2.5, np.float32), "batch": np.zeros(3, np.int64)}, "non-negative integers"),
        ({"counts": np.ones((3, GENES), np.float32), "batch": np.array([0, 1, 2])}, "batch"),
        ({"counts": np.ones((3, GENES), np.float32)}, "batch"),
    ],
    ids=["fractional-counts", "unknown-category", "missing-covariate"],
)
def test_bad_count_data_is_one_line_exit_2(tmp_path, data, phrase):
    document, tensors = _count_document("poisson", "latent")
    path = _write(tmp_path / "m.safetensors", document, tensors)
    np.savez(tmp_path / "cells.npz", **data)
    result = cli("elbo", path, tmp_path / "cells.npz", "--key", "counts", code=2)
    assert result.stderr.count("\n") == 1 and phrase in result.stderr, result.stderr
