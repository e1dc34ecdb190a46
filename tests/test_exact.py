"""Estimators against exact answers: probabilistic PCA in closed form, a 1-D latent by quadrature.

Monte Carlo checks use tolerances of 4 standard errors, each derived from the
exact variance of the estimator, never guessed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import LOG_2PI, PPCA, gaussian_kl_to_standard, one_dimensional_bernoulli

from vaeeval import evaluate

Z = 4.0  # standard errors allowed for a Monte Carlo estimate


@pytest.mark.parametrize("samples", [1, 10, 1000])
def test_exact_posterior_makes_iwae_equal_log_px_for_every_k(ppca: PPCA, tmp_path, samples):
    model = ppca.save(tmp_path / "ppca.safetensors")
    x = ppca.sample(40, np.random.default_rng(2))
    result = evaluate(model, x, samples=samples, seed=3)
    np.testing.assert_allclose(result.points.iwae, ppca.log_px(x), atol=1e-3, rtol=0)


def test_exact_posterior_kl_and_elbo(ppca: PPCA, tmp_path):
    model = ppca.save(tmp_path / "ppca.safetensors")
    x = ppca.sample(40, np.random.default_rng(2))
    mean, var = ppca.posterior(x)
    result = evaluate(model, x, samples=500, seed=1)
    np.testing.assert_allclose(result.points.kl, gaussian_kl_to_standard(mean, var), atol=1e-4, rtol=0)
    expected, stderr = _expected_recon(ppca, x, mean, np.broadcast_to(var, mean.shape), 500)
    assert np.all(np.abs(result.points.recon - expected) < Z * stderr + 1e-5)


def _expected_recon(ppca: PPCA, x, mean, var, samples):
    """E_q log p(x|z) and the standard error of its K-sample mean, both exact.

    With z ~ N(m, S), the residual r = x - b - W z is N(r0, A), A = W S W^T, and
    ||r||^2 has mean |r0|^2 + tr A and variance 2 tr(A^2) + 4 r0^T A r0.
    """
    s2 = ppca.sigma**2
    r0 = x - ppca.b - mean @ ppca.W.T
    A = np.einsum("dl,nl,el->nde", ppca.W, var, ppca.W)
    mean_sq = np.sum(r0**2, axis=1) + np.trace(A, axis1=1, axis2=2)
    var_sq = 2 * np.einsum("nde,ned->n", A, A) + 4 * np.einsum("nd,nde,ne->n", r0, A, r0)
    expected = -0.5 * ppca.dims * (LOG_2PI + math.log(s2)) - mean_sq / (2 * s2)
    return expected, np.sqrt(var_sq / (4 * s2**2) / samples)


def _kl_gaussians(m1, v1, m2, v2):
    return 0.5 * np.sum(np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0, axis=-1)


def test_perturbed_encoder_bounds_and_exact_terms(ppca: PPCA, tmp_path):
    """ELBO = log p(x) - KL(q || posterior) in expectation, and ELBO <= IWAE <= log p(x)."""
    samples = 4000
    model = ppca.save(tmp_path / "ppca.safetensors", mean_scale=0.8, log_var_shift=0.5)
    x = ppca.sample(30, np.random.default_rng(5))
    post_mean, post_var = ppca.posterior(x)
    q_mean, q_var = 0.8 * post_mean, np.broadcast_to(post_var * math.e**0.5, post_mean.shape)
    result = evaluate(model, x, samples=samples, seed=7)
    log_px = ppca.log_px(x)

    np.testing.assert_allclose(result.points.kl, gaussian_kl_to_standard(q_mean, q_var), atol=1e-4, rtol=0)
    recon, recon_se = _expected_recon(ppca, x, q_mean, q_var, samples)
    assert np.all(np.abs(result.points.recon - recon) < Z * recon_se + 1e-5)
    exact_elbo = log_px - _kl_gaussians(q_mean, q_var, post_mean, post_var)
    assert np.all(np.abs(result.points.elbo - exact_elbo) < Z * recon_se + 1e-5)

    # Var_q(w / p(x)) = prod_l int post^2 / q - 1, a product of 1-D Gaussian integrals
    ratio = np.prod(
        q_var / np.sqrt(post_var * (2 * q_var - post_var)) * np.exp((post_mean - q_mean) ** 2 / (2 * q_var - post_var)),
        axis=1,
    )
    iwae_se = np.sqrt((ratio - 1) / samples)
    assert np.all(result.points.iwae <= log_px + Z * iwae_se)
    assert np.all(result.points.iwae >= log_px - Z * iwae_se - (ratio - 1) / samples)
    assert np.all(result.points.elbo <= result.points.iwae + Z * recon_se)
    assert np.mean(result.points.iwae - result.points.elbo) > 0.1


def test_one_dimensional_latent_matches_quadrature(tmp_path):
    """A 1-D latent Bernoulli VAE: log p(x), E_q log p(x|z) and KL by quadrature on a fine grid."""
    exact = one_dimensional_bernoulli(tmp_path)
    model, encoder, x, grid, step = exact.model, exact.encoder, exact.x, exact.grid, exact.step
    log_lik, log_joint, log_px, log_prior = exact.log_lik, exact.log_joint, exact.log_px, exact.log_prior
    samples = 20000
    result = evaluate(model, x.astype(np.float32), samples=samples, seed=11)
    mean, log_var = (encoder[0].weight.detach().double().numpy() @ x.T + encoder[0].bias.detach().double().numpy()[:, None])
    var = np.exp(log_var)
    log_q = -0.5 * (grid - mean[:, None]) ** 2 / var[:, None] - 0.5 * np.log(2 * np.pi * var[:, None])
    q = np.exp(log_q) * step
    recon = np.sum(q * log_lik, axis=1)
    recon_se = np.sqrt(np.sum(q * (log_lik - recon[:, None]) ** 2, axis=1) / samples)
    ratio = np.sum(np.exp(2 * (log_joint - log_px[:, None]) - log_q) * step, axis=1)  # E_q[(w/p)^2]
    iwae_se = np.sqrt((ratio - 1) / samples)

    np.testing.assert_allclose(result.points.kl, np.sum(q * (log_q - log_prior), axis=1), atol=1e-4, rtol=0)
    assert np.all(np.abs(result.points.recon - recon) < Z * recon_se + 1e-5)
    assert np.all(np.abs(result.points.iwae - log_px) < Z * iwae_se + (ratio - 1) / samples + 1e-5)
