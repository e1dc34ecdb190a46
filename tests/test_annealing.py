"""The annealing pieces: schedules, HMC that leaves its target invariant, the step-size rule, keyed noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Independent, Normal

from vaeeval.estimators.annealing.kernel import (
    ADAPT_DOWN,
    ADAPT_UP,
    FORWARD,
    SCHEDULES,
    STEP_SIZE_RANGE,
    Chains,
    State,
    anneal,
    chain_counters,
    decodable,
    hmc,
    log_prob_and_grad,
    schedule,
)

Z = 4.0


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 500])
def test_schedules_run_from_zero_to_one_strictly_increasing(name, steps):
    betas = schedule(name, steps)
    assert betas.shape == (steps + 1,) and betas[0] == 0.0 and betas[-1] == 1.0
    assert np.all(np.diff(betas) > 0)


def test_sigmoid_schedule_is_wu_et_al_and_dense_at_both_ends():
    betas = schedule("sigmoid", 1000)
    s = 1 / (1 + np.exp(-4 * (2 * np.linspace(0, 1, 1001) - 1)))
    np.testing.assert_allclose(betas, (s - s[0]) / (s[-1] - s[0]), atol=1e-15)
    steps = np.diff(betas)
    assert steps[0] < steps[500] / 10 and steps[-1] < steps[500] / 10
    geometric = schedule("geometric", 1000)
    assert geometric[1] == pytest.approx(1e-4 ** (1 - 1 / 1000)) and np.diff(geometric)[0] < np.diff(geometric)[-1]


def test_diagonal_gaussian_log_density_and_gradient_match_autograd():
    torch.manual_seed(0)
    loc, scale = torch.randn(3, 1, 4, dtype=torch.float64), torch.rand(3, 1, 4, dtype=torch.float64) + 0.1
    z = torch.randn(3, 5, 4, dtype=torch.float64)
    log_p, grad = log_prob_and_grad(Independent(Normal(loc, scale), 1), z)
    reference = z.clone().requires_grad_(True)
    expected = Independent(Normal(loc, scale), 1).log_prob(reference)
    (expected_grad,) = torch.autograd.grad(expected.sum(), reference)
    torch.testing.assert_close(log_p, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_counters_key_each_chain_and_step_apart_whatever_the_number_of_chains():
    assert np.array_equal(chain_counters(3, 4, 2)[:2], chain_counters(3, 2, 2))
    every = np.concatenate([chain_counters(t, 5, 3).ravel() for t in range(4)])
    assert np.unique(every).size == every.size


class GaussianTarget:
    """A target whose f_β is N(0, s_β²) per dimension: q0 = N(0, 4), γ = N(0, 0.25) (normalized, so p(x) = 1)."""

    def __init__(self, inner: float = 1.0) -> None:
        self.init = Independent(Normal(torch.zeros(1, 1, 2, dtype=torch.float64), 2.0), 1)
        self.target = Independent(Normal(torch.zeros(1, 1, 2, dtype=torch.float64), 0.5), 1)
        self.inner = inner  # the inner leapfrog steps read the gradients times this

    def evaluate(self, z: torch.Tensor) -> State:
        log_target, grad_target = log_prob_and_grad(self.target, z)
        log_init, grad_init = log_prob_and_grad(self.init, z)
        return State(log_target, grad_target, log_init, grad_init)

    def gradients(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.evaluate(z)
        return self.inner * state.grad_target, self.inner * state.grad_init


@pytest.mark.parametrize(("scale", "inner"), [(None, 1.0), ((1.0, 0.3), 1.0), (None, 0.7)], ids=["identity", "diagonal", "inexact"])
def test_hmc_leaves_its_target_invariant(scale, inner):
    """Exact draws from f_β stay exact draws after a transition: mean 0 and the right variance,
    with the identity mass matrix or a diagonal one (here far from the target's widths), and when
    the inner leapfrog steps read a gradient 30% off (as ``Likelihood.grad`` may round differently:
    any deterministic vector field gives a reversible, volume-preserving map)."""
    target, beta = GaussianTarget(inner), 0.5
    precision = (1 - beta) / 4 + beta / 0.25  # the geometric mean of two Gaussians is a Gaussian
    chains = 20000
    generator = torch.Generator().manual_seed(0)
    scale = None if scale is None else torch.tensor([scale], dtype=torch.float64)
    z = decodable(torch.randn(1, chains, 2, generator=generator, dtype=torch.float64) / math.sqrt(precision))
    for _ in range(3):
        momentum = torch.randn(1, chains, 2, generator=generator, dtype=torch.float64)
        log_u = torch.log(torch.rand(1, chains, generator=generator, dtype=torch.float64))
        z, _, accepted = hmc(target, z, target.evaluate(z), beta, torch.tensor([0.9]), momentum, log_u, 5, scale=scale)
    assert 0.2 < accepted.double().mean() < 1.0  # the kernel really moved
    variance = z.var().item() * precision
    assert abs(variance - 1) < Z * math.sqrt(2 / (2 * chains))
    assert abs(z.mean().item()) * math.sqrt(precision * 2 * chains) < Z


def test_a_proposal_with_no_finite_density_is_rejected():
    class Broken(GaussianTarget):
        def evaluate(self, z):
            state = super().evaluate(z)
            state.log_target = torch.where(z[..., 0] > 0, torch.nan, state.log_target)
            return state

    target = Broken()
    z = decodable(-torch.ones(1, 4, 2, dtype=torch.float64))
    momentum = torch.tensor([[[5.0, 0.0]] * 4], dtype=torch.float64)  # straight into the NaN region
    new, _, accepted = hmc(target, z, target.evaluate(z), 0.5, torch.tensor([0.5]), momentum, torch.zeros(1, 4) - 1e-9, 3)
    assert not accepted.any() and torch.equal(new, z)


def test_annealing_a_normalized_gaussian_path_gives_weights_of_mean_one():
    """Both ends normalized: E[w] = Z_T / Z_0 = 1, whatever T."""
    target = GaussianTarget()
    chains = 4000
    z = decodable(torch.randn(1, chains, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2)
    steps = 20
    found = anneal(target, z, schedule("linear", steps), torch.full((1, steps + 1), 0.3, dtype=torch.float64),
                   seed=0, indices=np.array([0]), streams=FORWARD, leapfrog=3)
    w = found.log_weight.exp()
    assert abs(w.mean().item() - 1) < Z * w.std().item() / math.sqrt(chains)


def test_the_pilot_rule_multiplies_by_1_02_above_65_percent_and_0_98_below(monkeypatch):
    """ε for f_{t+1} is ε_t × 1.02 when the point's chains accepted more than 65%, else × 0.98, clipped."""
    import vaeeval.estimators.annealing.kernel as annealing

    steps, rates = 40, iter(np.tile([1.0, 0.5, 0.7, 0.6], 10))

    def scripted(target, z, state, beta, step_size, momentum, log_uniform, leapfrog, scale=None):
        share = next(rates)
        accepted = torch.arange(z.shape[1])[None, :].expand(z.shape[0], -1) < share * z.shape[1]
        return z, state, accepted

    monkeypatch.setattr(annealing, "hmc", scripted)
    start = torch.zeros(2, steps + 1, dtype=torch.float64)
    start[:, 1] = torch.tensor([0.1, 0.499])
    z = decodable(torch.zeros(2, 20, 2, dtype=torch.float64))
    found: Chains = anneal(GaussianTarget(), z, schedule("linear", steps), start, seed=0, indices=np.arange(2),
                           streams=FORWARD, leapfrog=1, adapt=True)
    ratios = (found.step_sizes[0, 2:steps] / found.step_sizes[0, 1 : steps - 1]).numpy()
    expected = np.where(np.tile([1.0, 0.5, 0.7, 0.6], 10)[: steps - 2] > 0.65, ADAPT_UP, ADAPT_DOWN)
    np.testing.assert_allclose(ratios, expected, rtol=1e-12)
    assert found.step_sizes[1, 1:steps].max().item() <= STEP_SIZE_RANGE[1]
    assert found.step_sizes[1, 2].item() == STEP_SIZE_RANGE[1]  # 0.499 x 1.02, clipped


def test_a_fitted_schedule_spaces_steps_by_the_spread_of_the_increments():
    """Equal Δβ · sd per step: a flat spread gives the linear schedule; where the spread is 100× (sd 10×),
    steps are 10× denser (up to the 5% floor); the ends stay 0 and 1 and β only grows."""
    from vaeeval.estimators.annealing.kernel import FITTED_FLOOR, fitted_schedule

    steps = 1000
    base = torch.from_numpy(schedule("linear", steps))[None].expand(2, -1)
    spread = torch.ones(2, steps + 1, dtype=torch.float64)
    spread[1, 1 : steps // 2 + 1] = 100.0  # the first half of the path: sd 10
    fitted = fitted_schedule(base, spread)
    torch.testing.assert_close(fitted[0], base[0], rtol=0, atol=1e-12)
    assert fitted[:, 0].eq(0).all() and fitted[:, -1].eq(1).all() and (fitted.diff(dim=1) > 0).all()
    floor = FITTED_FLOOR * (10 + 1) / 2
    share = (0.5 * (10 + floor)) / (0.5 * (10 + floor) + 0.5 * (1 + floor))  # of the length in the first half
    below_half = (fitted[1] < 0.5).sum().item()
    assert abs(below_half / steps - share) < 2 / steps
