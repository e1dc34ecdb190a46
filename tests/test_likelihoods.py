"""Likelihood families against scipy.stats and closed forms, constants included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.distributions import ContinuousBernoulli

from vaeeval.errors import SpecError
from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods import StableContinuousBernoulli, likelihood_from_spec

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
        ({"family": "weibull"}, {}, "family 'weibull' is not supported"),
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


# ---------------------------------------------------------------- the other families


def test_laplace_every_scale_form_is_scipy_logpdf():
    rng = np.random.default_rng(4)
    x = torch.as_tensor(rng.normal(size=(5, *SHAPE)), dtype=torch.float32)
    log_scale = torch.as_tensor(rng.normal(scale=0.5, size=SHAPE), dtype=torch.float32)
    cases = [
        ({"family": "laplace", "scale": 0.7}, {}, 1, lambda p: 0.7),
        ({"family": "laplace", "log_scale": "ls"}, {"ls": log_scale}, 1, lambda p: np.exp(log_scale.double().numpy())),
        ({"family": "laplace"}, {}, 2, lambda p: np.exp(p[:, 1].double().numpy())),
    ]
    for spec, tensors, p, scale in cases:
        likelihood = likelihood_from_spec(spec, tensors, SHAPE)
        params = _params(p, rng)
        expected = _sum(stats.laplace.logpdf(x.double().numpy(), params[:, 0].double().numpy(), scale(params)))
        np.testing.assert_allclose(likelihood.log_prob(params, x).numpy(), expected, rtol=1e-6)
        assert likelihood.params_per_dim == p and likelihood.measure == "density"


def _cb_log_norm_reference(eta: float) -> float:
    """log(eta / tanh(eta / 2)) in float64 (2 at eta = 0)."""
    return math.log(2.0) if eta == 0 else math.log(eta / math.tanh(eta / 2))


@pytest.mark.parametrize("logit", [-100.0, -30.0, -16.0, -3.0, -1e-3, 0.0, 1e-5, 0.5, 16.0, 30.0, 100.0])
def test_continuous_bernoulli_matches_closed_form_at_any_logit(logit):
    likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (3,))
    x = torch.tensor([[0.0, 0.3, 1.0]])
    found = likelihood.log_prob(torch.full((1, 1, 3), logit), x).item()
    # log p(x) = log C + x * eta - softplus(eta)
    softplus = max(logit, 0) + math.log1p(math.exp(-abs(logit)))
    expected = sum(_cb_log_norm_reference(logit) + v * logit - softplus for v in (0.0, 0.3, 1.0))
    assert found == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_continuous_bernoulli_agrees_with_torch_where_torch_is_right():
    likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (50,))
    logits = torch.linspace(-10, 10, 50)[None, None]
    x = torch.rand(1, 50)
    reference = torch.distributions.ContinuousBernoulli(logits=logits[:, 0].double()).log_prob(x.double()).sum()
    assert likelihood.log_prob(logits, x).item() == pytest.approx(reference.item(), rel=1e-5)


def test_stable_continuous_bernoulli_is_torchs_for_moderate_logits():
    logits = torch.linspace(-4.99, 4.99, 101, dtype=torch.float64)[:, None]  # 0 among them
    x = torch.linspace(0, 1, 11, dtype=torch.float64)
    found = StableContinuousBernoulli(logits=logits).log_prob(x)
    torch.testing.assert_close(found, ContinuousBernoulli(logits=logits).log_prob(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("logit", [30.0, 60.0, 120.0])
def test_stable_continuous_bernoulli_keeps_growing_like_log_logit_where_torch_clamps(logit):
    """At the mode, log p = log C(eta) - softplus(-|eta|) = log |eta| + O(e^-|eta|); torch's stalls near 3.58."""
    eta = torch.tensor([logit, -logit], dtype=torch.float64)
    at_mode = torch.tensor([1.0, 0.0], dtype=torch.float64)
    found = StableContinuousBernoulli(logits=eta).log_prob(at_mode)
    assert torch.isfinite(found).all()
    torch.testing.assert_close(found, torch.full((2,), math.log(logit), dtype=torch.float64), rtol=1e-12, atol=0)
    if logit >= 60:
        assert (math.log(logit) - ContinuousBernoulli(logits=eta).log_prob(at_mode) > 0.5).all()  # torch's is wrong here


def test_stable_continuous_bernoulli_does_not_override_torchs_private_hook():
    """It writes log_prob out with its own normalizer; torch's private _cont_bern_log_norm stays torch's."""
    assert "_cont_bern_log_norm" not in StableContinuousBernoulli.__dict__
    assert "log_prob" in StableContinuousBernoulli.__dict__


def test_continuous_bernoulli_density_integrates_to_one():
    from scipy.integrate import quad

    for logit in (-40.0, -2.0, 0.0, 3.0, 40.0):
        likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (1,))
        params = torch.full((1, 1, 1), logit, dtype=torch.float64)

        def density(v: float, likelihood=likelihood, params=params) -> float:
            return math.exp(likelihood.log_prob(params, torch.tensor([[v]], dtype=torch.float64)).item())

        assert quad(density, 0, 1, points=[0.01, 0.99], limit=200)[0] == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("levels", [2, 5, 17])
def test_categorical_is_log_softmax_and_sums_to_one(levels):
    rng = np.random.default_rng(5)
    likelihood = likelihood_from_spec({"family": "categorical", "levels": levels}, {}, (4,))
    params = torch.as_tensor(rng.normal(scale=3, size=(1, levels, 4)), dtype=torch.float32)
    grid = torch.arange(levels, dtype=torch.float32) / (levels - 1)
    per_level = torch.stack([likelihood.log_prob(params, torch.full((1, 4), v)) for v in grid])  # [L, 1]
    # each dimension sums to 1, so the product over 4 dims of level-wise sums is 1 too:
    elementwise = torch.stack([likelihood.elementwise_log_prob(params, torch.full((1, 4), v)) for v in grid])
    torch.testing.assert_close(elementwise.exp().sum(0), torch.ones(1, 4))
    expected = torch.log_softmax(params.double(), dim=1)[0, 1].sum()  # every dim at level 1
    assert per_level[1].item() == pytest.approx(expected.item(), rel=1e-6)


def _logistic_bin_reference(v: float, mean: float, scale: float, levels: int) -> float:
    """log(F(b) - F(a)) from scipy's log-CDF and log-survival function, in whichever tail is accurate."""
    half = 0.5 / (levels - 1)
    logistic = stats.logistic(mean, scale)
    if v <= 0:
        return float(logistic.logcdf(v + half))
    if v >= 1:
        return float(logistic.logsf(v - half))
    if v > mean:
        small, large = logistic.logsf(v + half), logistic.logsf(v - half)
    else:
        small, large = logistic.logcdf(v - half), logistic.logcdf(v + half)
    return float(large + math.log1p(-math.exp(small - large)))


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_logistic_is_cdf_difference_and_sums_to_one(levels):
    likelihood = likelihood_from_spec({"family": "discretized_logistic", "levels": levels}, {}, (1,))
    grid = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    for mean, log_scale in ((0.3, -2.0), (0.5, -5.0), (1.2, 0.0), (-0.1, -3.0)):
        params = torch.tensor([[[mean], [log_scale]]], dtype=torch.float64)
        logs = torch.stack([likelihood.log_prob(params, torch.tensor([[v]], dtype=torch.float64)) for v in grid])
        assert torch.logsumexp(logs, 0).item() == pytest.approx(0.0, abs=1e-9)
        for k in (0, levels // 3, levels - 1):
            expected = _logistic_bin_reference(float(grid[k]), mean, math.exp(log_scale), levels)
            assert logs[k].item() == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_discretized_logistic_is_stable_far_in_the_tail_in_float32():
    likelihood = likelihood_from_spec({"family": "discretized_logistic", "levels": 256}, {}, (1,))
    params = torch.tensor([[[0.0], [-7.0]]])  # scale ~ 1e-3: the bin at 0.9 is ~900 scales away
    found = likelihood.log_prob(params, torch.tensor([[0.9]])).item()
    # both edges deep in the upper tail: log(sigmoid(-u_a) - sigmoid(-u_b)) ~ -u_a + log(1 - e^-(width/s))
    s = math.exp(-7.0)
    u_a, width = (0.9 - 0.5 / 255) / s, (1 / 255) / s
    assert found == pytest.approx(-u_a + math.log(-math.expm1(-width)), rel=1e-5)
    assert math.isfinite(found)


# ---------------------------------------------------------------- bins of continuous families


def test_gaussian_on_binary_bins_is_log_phi_of_the_split():
    """The issue's closed form: log Phi((0.5 - mu)/sigma) for 0 and log(1 - Phi((0.5 - mu)/sigma)) for 1."""
    sigma = 0.3
    likelihood = likelihood_from_spec({"family": "gaussian", "sigma": sigma}, {}, (4,))
    mean = torch.tensor([[[0.1, 0.9, -3.0, 4.0]]])
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    found = likelihood.log_prob(mean, x, bins=Grid(2)).item()
    t = (0.5 - mean[0, 0].double().numpy()) / sigma
    expected = stats.norm.logcdf(t[0]) + stats.norm.logsf(t[1]) + stats.norm.logsf(t[2]) + stats.norm.logcdf(t[3])
    assert found == pytest.approx(expected, rel=1e-9)


FAMILIES_ON_BINS = [
    ({"family": "gaussian", "sigma": 0.05}, 1, lambda p, a, b: stats.norm.cdf(b, p[0], 0.05) - stats.norm.cdf(a, p[0], 0.05)),
    ({"family": "gaussian"}, 2, lambda p, a, b: stats.norm.cdf(b, p[0], math.exp(p[1])) - stats.norm.cdf(a, p[0], math.exp(p[1]))),
    ({"family": "laplace", "scale": 0.05}, 1, lambda p, a, b: stats.laplace.cdf(b, p[0], 0.05) - stats.laplace.cdf(a, p[0], 0.05)),
]


@pytest.mark.parametrize(("spec", "p", "reference"), FAMILIES_ON_BINS)
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_location_scale_bins_are_cdf_differences_and_sum_to_one(spec, p, reference, levels):
    likelihood = likelihood_from_spec(spec, {}, (1,))
    grid = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    half = 0.5 / (levels - 1)
    for raw in ([0.37, -2.5], [0.0, -4.0], [1.5, -1.0]):
        params = torch.tensor([raw[:p]], dtype=torch.float64)[..., None]
        logs = torch.stack([likelihood.log_prob(params, torch.tensor([[v]], dtype=torch.float64), bins=Grid(levels)) for v in grid])
        assert torch.logsumexp(logs, 0).item() == pytest.approx(0.0, abs=1e-9)
        for k in (0, levels // 2, levels - 1):
            v = float(grid[k])
            a = -math.inf if k == 0 else v - half
            b = math.inf if k == levels - 1 else v + half
            probability = reference(raw, a, b)
            if probability > 1e-12:
                assert logs[k].item() == pytest.approx(math.log(probability), rel=1e-7)


@pytest.mark.parametrize("mean", [-40.0, 40.0])
def test_gaussian_bins_stay_accurate_far_in_the_tails(mean):
    """50 standard deviations away, where cdf(b) - cdf(a) is 0 in float32 and float64 alike."""
    likelihood = likelihood_from_spec({"family": "gaussian", "sigma": 1.0}, {}, (1,))
    x = torch.tensor([[0.5]])
    found = likelihood.log_prob(torch.tensor([[[mean]]]), x, bins=Grid(3)).item()
    a, b = (0.25 - mean), (0.75 - mean)
    if a + b > 0:  # mirror into the lower tail, where scipy's logcdf is accurate
        a, b = -b, -a
    expected = stats.norm.logcdf(b) + math.log(-math.expm1(stats.norm.logcdf(a) - stats.norm.logcdf(b)))
    assert math.isfinite(found) and found == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("logit", [-100.0, -20.0, -1e-8, 0.0, 2.0, 100.0])
@pytest.mark.parametrize("levels", [2, 17])
def test_continuous_bernoulli_bins_sum_to_one_and_match_quadrature(logit, levels):
    from scipy.integrate import quad

    likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (1,))
    params = torch.full((1, 1, 1), logit, dtype=torch.float64)
    grid = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    logs = torch.stack([likelihood.log_prob(params, torch.tensor([[v]], dtype=torch.float64), bins=Grid(levels)) for v in grid])
    assert torch.logsumexp(logs, 0).item() == pytest.approx(0.0, abs=1e-9)
    if abs(logit) <= 20:
        def density(v: float, likelihood=likelihood, params=params) -> float:
            return math.exp(likelihood.log_prob(params, torch.tensor([[v]], dtype=torch.float64)).item())
        half = 0.5 / (levels - 1)
        k = levels // 2
        a, b = max(0.0, float(grid[k]) - half), min(1.0, float(grid[k]) + half)
        assert logs[k].item() == pytest.approx(math.log(quad(density, a, b)[0]), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("log_scale", [-30.0, 30.0])
def test_learned_scales_are_exact_at_extreme_log_scales_in_float32(log_scale):
    x = torch.tensor([[0.25, -1.0]])
    params = torch.tensor([[[0.0, -1.0], [log_scale, log_scale]]])  # the second point sits on its mean
    scale, residual = math.exp(log_scale), np.array([0.25, 0.0])
    closed_forms = {  # scipy's laplace.logpdf underflows to -inf here, so the closed forms
        "gaussian": -0.5 * (residual / scale) ** 2 - log_scale - 0.5 * math.log(2 * math.pi),
        "laplace": -np.abs(residual) / scale - log_scale - math.log(2),
    }
    for family, expected in closed_forms.items():
        likelihood = likelihood_from_spec({"family": family}, {}, (2,))
        assert likelihood.log_prob(params, x).item() == pytest.approx(expected.sum(), rel=1e-5)


def test_categorical_is_exact_at_extreme_logits():
    likelihood = likelihood_from_spec({"family": "categorical", "levels": 3}, {}, (1,))
    params = torch.tensor([[[1e4], [-1e4], [0.0]]])
    values = [likelihood.log_prob(params, torch.tensor([[v]])).item() for v in (0.0, 0.5, 1.0)]
    assert values[0] == 0.0 and values[1] == pytest.approx(-2e4) and values[2] == pytest.approx(-1e4)


@pytest.mark.parametrize("scale", [0.1, 3.0, 60.0])
@pytest.mark.parametrize("dims", [1, 7, 784, 1001])
def test_bernoulli_through_the_last_linear_layer_is_the_log_pmf(scale, dims):
    """The shortcut (one dot product, one exp per element, logs of products) against float64 scipy."""
    rng = np.random.default_rng(dims)
    likelihood = likelihood_from_spec({"family": "bernoulli"}, {}, (dims,))
    head = torch.nn.Linear(30, dims)
    with torch.no_grad():
        head.weight.normal_(0, scale / math.sqrt(30), generator=torch.Generator().manual_seed(dims))
        head.bias.normal_(0, scale, generator=torch.Generator().manual_seed(dims + 1))
    hidden = torch.as_tensor(rng.normal(size=(3, 5, 30)), dtype=torch.float32)
    x = torch.as_tensor(rng.random((3, dims)) < 0.4, dtype=torch.float32)
    with torch.inference_mode():
        logits = head(hidden)
        projected, offset = likelihood.linear_projection(x, head)
        found = likelihood.log_prob_through_linear(hidden.clone(), logits.clone(), projected, offset).numpy()
    exact = torch.distributions.Bernoulli(logits=logits.double()).log_prob(x[:, None].double()).numpy()
    assert np.allclose(exact[np.abs(logits.numpy()) < 20], stats.bernoulli.logpmf(
        x.numpy()[:, None], torch.sigmoid(logits.double()).numpy())[np.abs(logits.numpy()) < 20], rtol=1e-6)
    # the shortcut's dot products round differently from the logits': a relative 1e-7 of their size
    tolerance = 1e-6 * np.abs(logits.numpy()).sum(-1) + 1e-6
    assert np.all(np.abs(found - exact.sum(-1)) <= tolerance)
