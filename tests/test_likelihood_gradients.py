"""The likelihoods' closed-form gradients (what AIS's leapfrog reads) against mpmath and autograd."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch

from vaeeval.format.domains import Grid
from vaeeval.format.likelihoods import likelihood_from_spec
from vaeeval.format.likelihoods.base import Likelihood

# both tails, the series' edges (|eta| = 1e-3 for the values, 0.1 for the gradients) on either side, and 0
LOGITS = [-1e4, -300.0, -20.0, -0.7, -0.1001, -1.0001e-3, -3e-7, 0.0, 1e-12, 2e-5, 9.99e-4, 3e-3, 0.0999, 0.1, 1.0, 50.0, 700.0, 1e4]


def _bin(levels: int, k: int) -> tuple[mpmath.mpf, mpmath.mpf]:
    """The bin of level k on [0, 1], exactly: the outermost bins reach 0 and 1."""
    step = mpmath.mpf(1) / (levels - 1)
    return (mpmath.mpf(0) if k == 0 else (k - mpmath.mpf(0.5)) * step), (mpmath.mpf(1) if k == levels - 1 else (k + mpmath.mpf(0.5)) * step)


def _continuous_bernoulli_bin(eta: float, a: mpmath.mpf, b: mpmath.mpf) -> tuple[float, float]:
    """log P([a, b]) under the continuous Bernoulli with logit eta, and its derivative in eta, at 60 digits."""
    with mpmath.workdps(60):
        e = mpmath.mpf(eta)
        if e == 0:
            return float(mpmath.log(b - a)), float((a + b - 1) / 2)
        log_p = mpmath.log((mpmath.exp(b * e) - mpmath.exp(a * e)) / (mpmath.exp(e) - 1))
        upper, lower = mpmath.exp(b * e), mpmath.exp(a * e)
        slope = (b * upper - a * lower) / (upper - lower) - mpmath.exp(e) / (mpmath.exp(e) - 1)
        return float(log_p), float(slope)


@pytest.mark.parametrize("levels", [2, 17, 256, 65536])
def test_continuous_bernoulli_bins_and_their_gradient_are_mpmaths_in_both_tails(levels):
    likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (1,))
    for k in sorted({0, 1, levels // 2, levels - 2, levels - 1}):
        x = torch.tensor([[[k / (levels - 1)]]], dtype=torch.float64)
        params = torch.tensor(LOGITS, dtype=torch.float64)[:, None, None, None]  # [logits, 1 sample, P = 1, D = 1]
        log_p, grad = likelihood.log_prob_and_grad(params, x, Grid(levels))
        assert torch.equal(log_p, likelihood.log_prob(params, x, Grid(levels)))  # the same numbers the estimators report
        alone = likelihood.grad(params, x, Grid(levels))  # the leapfrog's inner steps: 1 - e^-y without Kahan's correction
        for i, eta in enumerate(LOGITS):
            expected, slope = _continuous_bernoulli_bin(eta, *_bin(levels, k))
            assert log_p[i, 0].item() == pytest.approx(expected, rel=1e-13, abs=1e-13), (eta, k)
            assert grad[i, 0, 0, 0].item() == pytest.approx(slope, abs=1e-12), (eta, k)
            assert alone[i, 0, 0, 0].item() == pytest.approx(slope, abs=2e-9), (eta, k)


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_continuous_bernoulli_density_gradient_is_x_minus_the_mean(value):
    likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (1,))
    params = torch.tensor([v for v in LOGITS if v != 0.0], dtype=torch.float64)[:, None, None, None]
    x = torch.tensor([[[value]]], dtype=torch.float64)
    log_p, grad = likelihood.log_prob_and_grad(params, x)
    assert torch.equal(log_p, likelihood.log_prob(params, x))
    alone = likelihood.grad(params, x)
    for i, eta in enumerate(params.flatten().tolist()):
        with mpmath.workdps(60):
            e = mpmath.mpf(eta)
            slope = float(value - mpmath.exp(e) / (mpmath.exp(e) - 1) + 1 / e)
        assert grad[i, 0, 0, 0].item() == pytest.approx(slope, abs=1e-12), eta
        assert alone[i, 0, 0, 0].item() == pytest.approx(slope, abs=2e-9), eta


CLOSED_FORMS = [  # (spec, P, grid levels or None): every family with its own log_prob_and_grad
    ({"family": "continuous_bernoulli"}, 1, None),
    ({"family": "continuous_bernoulli"}, 1, 17),
    ({"family": "gaussian", "sigma": 0.1}, 1, 17),
    ({"family": "gaussian"}, 2, 256),
    ({"family": "laplace", "scale": 0.05}, 1, 17),
    ({"family": "categorical", "levels": 5}, 5, None),
]


@pytest.mark.parametrize(("spec", "p", "levels"), CLOSED_FORMS)
def test_closed_form_gradients_are_autograds(spec, p, levels):
    """At moderate parameters (where autograd through the log-probability is accurate) the two agree."""
    dims = 6
    likelihood = likelihood_from_spec(spec, {}, (dims,))
    rng = np.random.default_rng(0)
    params = torch.as_tensor(rng.normal(scale=2.0, size=(3, 4, p, dims)))
    if spec["family"] != "categorical":
        params[:, :, 0] = params[:, :, 0] / 4 + 0.5 if spec["family"] != "continuous_bernoulli" else params[:, :, 0]
    grid_levels = levels or spec.get("levels", 2)
    x = torch.as_tensor(rng.integers(0, grid_levels, size=(3, 1, dims)) / (grid_levels - 1))
    bins = Grid(levels) if levels else None
    log_p, grad = likelihood.log_prob_and_grad(params, x, bins)
    reference_log_p, reference = Likelihood.log_prob_and_grad(likelihood, params, x, bins)  # autograd through terms
    assert torch.equal(log_p, reference_log_p)
    assert grad.shape == params.shape and grad.dtype == params.dtype
    torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(likelihood.grad(params, x, bins), reference, rtol=1e-9, atol=1e-12)


def test_continuous_bernoulli_refuses_bins_too_narrow_to_score():
    from vaeeval.errors import VaeevalError

    likelihood = likelihood_from_spec({"family": "continuous_bernoulli"}, {}, (1,))
    narrow = Grid(3, 0.5, 0.5 + 1e-10)
    with pytest.raises(VaeevalError, match="narrower than 1e-09"):
        likelihood.log_prob(torch.zeros(1, 1, 1, dtype=torch.float64), torch.tensor([[0.5 + 5e-11]], dtype=torch.float64), narrow)
