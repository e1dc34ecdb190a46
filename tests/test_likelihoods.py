"""Likelihood families against scipy.stats and closed forms, constants included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from vaeeval.errors import SpecError
from vaeeval.likelihoods import likelihood_from_spec

SHAPE = (2, 3, 4)  # an image-like input shape: P splits the axis before it


def _params(p: int, rng: np.random.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.as_tensor(rng.normal(scale=scale, size=(5, p, *SHAPE)), dtype=torch.float32)


def _sum(values: np.ndarray) -> np.ndarray:
    return values.reshape(values.shape[0], -1).sum(axis=1)


def test_bernoulli_is_scipy_logpmf_and_minus_bce():
    rng = np.random.default_rng(0)
    likelihood = likelihood_from_spec({"family": "bernoulli"}, {}, SHAPE)
    params = _params(1, rng, scale=4.0)
    x = torch.as_tensor(rng.random((5, *SHAPE)) < 0.5, dtype=torch.float32)
    found = likelihood.log_prob(params, x).numpy()
    probs = torch.sigmoid(params[:, 0].double()).numpy()
    np.testing.assert_allclose(found, _sum(stats.bernoulli.logpmf(x.numpy(), probs)), rtol=1e-6)
    bce = F.binary_cross_entropy_with_logits(params[:, 0], x, reduction="none").double()
    np.testing.assert_allclose(found, -bce.flatten(1).sum(1).numpy(), rtol=1e-6)
    assert likelihood.measure == "probability" and likelihood.params_per_dim == 1


@pytest.mark.parametrize("logit", [-100.0, -30.0, 30.0, 100.0])
def test_bernoulli_is_exact_at_extreme_logits(logit):
    likelihood = likelihood_from_spec({"family": "bernoulli"}, {}, (2,))
    params = torch.full((1, 1, 2), logit)
    found = likelihood.log_prob(params, torch.tensor([[1.0, 0.0]])).item()
    expected = -math.log1p(math.exp(-logit)) - math.log1p(math.exp(logit)) if abs(logit) < 50 else -abs(logit)
    assert found == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_gaussian_fixed_sigma_is_scipy_logpdf():
    rng = np.random.default_rng(1)
    likelihood = likelihood_from_spec({"family": "gaussian", "sigma": 0.3}, {}, SHAPE)
    params, x = _params(1, rng), torch.as_tensor(rng.normal(size=(5, *SHAPE)), dtype=torch.float32)
    expected = _sum(stats.norm.logpdf(x.double().numpy(), params[:, 0].double().numpy(), 0.3))
    np.testing.assert_allclose(likelihood.log_prob(params, x).numpy(), expected, rtol=1e-6)
    assert likelihood.measure == "density" and likelihood.params_per_dim == 1


@pytest.mark.parametrize("shape", [(), SHAPE])
def test_gaussian_log_sigma_tensor_is_scipy_logpdf(shape):
    rng = np.random.default_rng(2)
    log_sigma = torch.as_tensor(rng.normal(scale=0.5, size=shape), dtype=torch.float32)
    likelihood = likelihood_from_spec(
        {"family": "gaussian", "log_sigma": "ls"}, {"ls": log_sigma}, SHAPE
    )
    params, x = _params(1, rng), torch.as_tensor(rng.normal(size=(5, *SHAPE)), dtype=torch.float32)
    sigma = np.exp(log_sigma.double().numpy())
    expected = _sum(stats.norm.logpdf(x.double().numpy(), params[:, 0].double().numpy(), sigma))
    np.testing.assert_allclose(likelihood.log_prob(params, x).numpy(), expected, rtol=1e-6)
    assert likelihood.tensors == ("ls",)


def test_gaussian_learned_scale_reads_second_block_as_log_sigma():
    rng = np.random.default_rng(3)
    likelihood = likelihood_from_spec({"family": "gaussian"}, {}, SHAPE)
    params, x = _params(2, rng), torch.as_tensor(rng.normal(size=(5, *SHAPE)), dtype=torch.float32)
    mean, sigma = params[:, 0].double().numpy(), np.exp(params[:, 1].double().numpy())
    expected = _sum(stats.norm.logpdf(x.double().numpy(), mean, sigma))
    np.testing.assert_allclose(likelihood.log_prob(params, x).numpy(), expected, rtol=1e-6)
    assert likelihood.params_per_dim == 2


def test_gaussian_is_mse_plus_scale_and_constant():
    """The README's claim: -log p = ||x - mu||^2 / (2 sigma^2) + D log sigma + D/2 log(2 pi)."""
    sigma, dims = 0.2, 10
    likelihood = likelihood_from_spec({"family": "gaussian", "sigma": sigma}, {}, (dims,))
    mean, x = torch.zeros(1, 1, dims), torch.linspace(-1, 1, dims)[None]
    squared_error = float((x**2).sum())
    expected = -(squared_error / (2 * sigma**2) + dims * math.log(sigma) + dims / 2 * math.log(2 * math.pi))
    assert likelihood.log_prob(mean, x).item() == pytest.approx(expected, rel=1e-6)


def test_log_prob_sums_in_float64():
    likelihood = likelihood_from_spec({"family": "gaussian", "sigma": 1.0}, {}, (4,))
    out = likelihood.log_prob(torch.zeros(3, 1, 4), torch.zeros(3, 4))
    assert out.dtype == torch.float64 and out.shape == (3,)


@pytest.mark.parametrize(
    ("spec", "tensors", "phrase"),
    [
        ({"family": "poisson"}, {}, "family 'poisson' is not supported"),
        ({"family": "gaussian", "sigma": 1.0, "log_sigma": "t"}, {"t": torch.zeros(())}, "not both"),
        ({"family": "gaussian", "sigma": -1.0}, {}, "positive finite number"),
        ({"family": "gaussian", "log_sigma": "t"}, {}, "which the file does not have"),
        ({"family": "gaussian", "log_sigma": "t"}, {"t": torch.zeros(5)}, "expected [] or [2, 3, 4]"),
        ({"family": "bernoulli", "levels": 3}, {}, "unknown key(s) levels"),
        ("bernoulli", {}, "must be an object"),
    ],
)
def test_bad_likelihood_specs_are_refused(spec, tensors, phrase):
    with pytest.raises(SpecError) as error:
        likelihood_from_spec(spec, tensors, SHAPE)
    assert phrase in str(error.value)
