"""Priors: a learned Gaussian and a mixture, checked with probabilistic PCA in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import PPCA, linear, make_ppca
from torch import nn

from vaeeval import evaluate, save_model
from vaeeval.errors import SpecError
from vaeeval.format.priors import prior_from_spec

Z = 4.0


def _ppca_with_prior(ppca: PPCA, prior_mean: np.ndarray, prior_var: np.ndarray):
    """Exact log p(x) and diagonal posterior of x = W z + b + noise with z ~ N(m0, diag v0)."""
    from scipy.stats import multivariate_normal

    precision = 1 / prior_var + np.diag(ppca.W.T @ ppca.W) / ppca.sigma**2  # diagonal: orthogonal columns
    post_var = 1 / precision

    def log_px(x):
        cov = ppca.W @ np.diag(prior_var) @ ppca.W.T + ppca.sigma**2 * np.eye(ppca.dims)
        return multivariate_normal(ppca.W @ prior_mean + ppca.b, cov).logpdf(x)

    def encoder() -> nn.Sequential:
        # post_mean = post_var * (m0 / v0 + W^T (x - b) / s^2): linear in x
        weight = np.vstack([post_var[:, None] * ppca.W.T / ppca.sigma**2, np.zeros_like(ppca.W.T)])
        bias = np.concatenate([post_var * (prior_mean / prior_var - ppca.W.T @ ppca.b / ppca.sigma**2), np.log(post_var)])
        return nn.Sequential(linear(weight, bias))

    return log_px, encoder, post_var


@pytest.mark.parametrize("family", ["gaussian", "mixture_of_gaussians"])
def test_exact_posterior_under_a_learned_prior_gives_log_px(tmp_path, family):
    ppca = make_ppca(dims=5, latent=2)
    prior_mean, prior_var = np.array([0.5, -1.0]), np.array([2.0, 0.5])
    log_px, encoder, _ = _ppca_with_prior(ppca, prior_mean, prior_var)
    mean, log_var = torch.tensor(prior_mean), torch.tensor(np.log(prior_var))
    if family == "gaussian":
        prior = {"family": "gaussian", "mean": mean, "log_var": log_var}
    else:  # one component: the same distribution, through the mixture code
        prior = {"family": family, "logits": torch.zeros(1), "means": mean[None], "log_vars": log_var[None]}
    model = save_model(
        tmp_path / "m.safetensors", encoder(), nn.Sequential(linear(ppca.W, ppca.b)),
        likelihood={"family": "gaussian", "sigma": ppca.sigma}, input_shape=[5], latent_dim=2, prior=prior,
    )
    x = ppca.sample(30, np.random.default_rng(0)) + ppca.W @ prior_mean
    result = evaluate(model, x, samples=50)
    np.testing.assert_allclose(result.points.iwae, log_px(x), atol=1e-3, rtol=0)
    assert result.kl_kind == ("analytic" if family == "gaussian" else "monte_carlo")


def test_mixture_kl_is_monte_carlo_with_a_standard_error_that_covers_the_truth(tmp_path):
    """Two identical components: the mixture is one Gaussian, whose KL is known in closed form."""
    ppca = make_ppca(dims=5, latent=2)
    prior_mean, prior_var = np.array([0.3, 0.0]), np.array([1.5, 1.0])
    _, encoder, _ = _ppca_with_prior(ppca, prior_mean, prior_var)
    enc = encoder()
    with torch.no_grad():
        enc[0].bias[2:] += 0.7  # a wider q: KL(q || p) is not the exact posterior's
    means = torch.tensor(np.stack([prior_mean, prior_mean]))
    log_vars = torch.tensor(np.log(np.stack([prior_var, prior_var])))
    model = save_model(
        tmp_path / "m.safetensors", enc, nn.Sequential(linear(ppca.W, ppca.b)),
        likelihood={"family": "gaussian", "sigma": ppca.sigma}, input_shape=[5], latent_dim=2,
        prior={"family": "mixture_of_gaussians", "logits": torch.tensor([0.3, -0.2]), "means": means, "log_vars": log_vars},
    )
    x = ppca.sample(40, np.random.default_rng(1))
    samples = 2000
    result = evaluate(model, x, samples=samples, seed=2)
    weight, bias = enc[0].weight.detach().double().numpy(), enc[0].bias.detach().double().numpy()
    out = x @ weight.T + bias
    q_mean, q_var = out[:, :2], np.exp(out[:, 2:])
    exact = 0.5 * np.sum(np.log(prior_var / q_var) + (q_var + (q_mean - prior_mean) ** 2) / prior_var - 1, axis=1)
    stderr = result.points.kl_stderr
    assert np.all(stderr > 0)
    assert np.all(np.abs(result.points.kl - exact) < Z * stderr)
    # and the standard error is the right size: sd of log q - log p over samples, / sqrt(K)
    assert np.median(np.abs(result.points.kl - exact) / stderr) < 1.5
    # with a Monte Carlo KL the ELBO is exactly the mean log-weight, so ELBO <= IWAE point by point
    assert np.all(result.points.elbo <= result.points.iwae + 1e-9)


@pytest.mark.parametrize(
    ("spec", "tensors", "phrase"),
    [
        ({"family": "gaussian", "mean": "m"}, {"m": torch.zeros(2)}, "needs log_var"),
        ({"family": "gaussian", "mean": "m", "log_var": "v"}, {"m": torch.zeros(3), "v": torch.zeros(2)}, "is [3], expected [2]"),
        ({"family": "gaussian", "mean": "m", "log_var": "v"}, {"m": torch.zeros(2)}, "which the file does not have"),
        ({"family": "gaussian", "mean": "m", "log_var": "v"}, {"m": torch.zeros(2), "v": torch.tensor([0.0, math.inf])}, "non-finite"),
        ({"family": "mixture_of_gaussians", "logits": "l", "means": "m", "log_vars": "v"},
         {"l": torch.zeros(3), "m": torch.zeros(2, 2), "v": torch.zeros(3, 2)}, "means tensor 'm' is [2, 2], expected [3, 2]"),
        ({"family": "vamp"}, {}, "prior family 'vamp' is not supported"),
    ],
)
def test_bad_prior_specs_are_refused(spec, tensors, phrase):
    with pytest.raises(SpecError) as error:
        prior_from_spec(spec, tensors, 2)
    assert phrase in str(error.value)
