"""Annealed importance sampling with Hamiltonian Monte Carlo: the tensor math, for a batch of points.

For a point x, AIS (Neal 2001) moves C chains from an initial distribution f_0 = q0 (the
encoder's q(z|x), or the prior p(z)) to the unnormalized posterior f_T = p(z) p(x|z) along
the geometric path

    log f_t(z) = (1 - β_t) log q0(z) + β_t log γ(z),   γ(z) = p(z) p(x|z),   0 = β_0 < ... < β_T = 1,

weighing each chain by log w = Σ_t (β_t - β_{t-1}) (log γ(z_{t-1}) - log q0(z_{t-1})), where
z_t is drawn from z_{t-1} by an HMC transition that leaves f_t invariant. E[w] = p(x).
Started from an exact posterior sample and run backwards (β from 1 to 0), the same sum s
gives E[exp(-s)] = 1/p(x) (Grosse, Ghahramani & Adams 2015).

HMC (Neal 2011): momentum p ~ N(0, I), ``leapfrog`` steps of size ε on -log f_t, accepted
with probability min(1, exp(-ΔH)). Each leapfrog step costs one decoder forward and
backward pass; the log-densities and gradients at the end of a trajectory are kept with the
state, so the acceptance test, the next weight increment and the next trajectory's first
half-step cost nothing more.

Positions are float64 values that float32 represents exactly: the decoder (float32) and the
densities (float64) see the same point. Noise is keyed by (seed, point, stream, chain, step)
through ``rng``, so no number depends on the batch, the process or the other points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.distributions import Distribution, Independent, Normal

from vaeeval.core import numerics, rng
from vaeeval.core.numerics import tree_sum
from vaeeval.errors import VaeevalError
from vaeeval.format.domains import Grid
from vaeeval.format.model import Model, rows_independently
from vaeeval.format.priors import Prior
from vaeeval.user.calls import first_line, where
from vaeeval.user.distributions import flows, log_prob64

SCHEDULES = ("sigmoid", "linear", "geometric")
SIGMOID_RADIUS = 4.0  # the sigmoid schedule runs over sigmoid(-4 .. 4) (Grosse et al. 2015; Wu et al. 2017)
GEOMETRIC_START = 1e-4  # the geometric schedule's beta_1 scale: beta_t = 1e-4 ** (1 - t / T)
TARGET_ACCEPTANCE = 0.65
ADAPT_UP, ADAPT_DOWN = 1.02, 0.98  # step size factors above / below the target acceptance (Wu et al. 2017)
STEP_SIZE_RANGE = (1e-4, 0.5)
SCALED_STEP_SIZE_RANGE = (1e-4, 2.0)  # ε in units of q0's standard deviations (a diagonal mass matrix)
_CHAIN_BITS = 24  # counters: (step << 24 | chain) keeps chains apart for up to 16 million chains


def schedule(name: str, steps: int) -> np.ndarray:
    """β_0 = 0 < β_1 < ... < β_T = 1, ``[T + 1]`` float64.

    ``linear``: t / T. ``sigmoid``: sigmoid(δ (2t/T - 1)) rescaled to run from 0 to 1,
    δ = 4, dense at both ends. ``geometric``: 1e-4 ** (1 - t/T) (β_0 = 0), dense near 0,
    where the path moves fastest for a poor initial distribution.
    """
    t = np.arange(steps + 1, dtype=np.float64) / steps
    if name == "linear":
        betas = t
    elif name == "sigmoid":
        s = 1 / (1 + numerics.exp(-SIGMOID_RADIUS * (2 * t - 1)))
        betas = (s - s[0]) / (s[-1] - s[0])
    elif name == "geometric":
        betas = GEOMETRIC_START ** (1 - t)
    else:
        raise ValueError(f"unknown schedule {name!r}")
    betas[0], betas[-1] = 0.0, 1.0
    return betas


FITTED_FLOOR = 0.05  # a fitted schedule's density of steps never falls below 5% of its mean (noise, flat stretches)


def fitted_schedule(betas: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """β ``[B, T + 1]`` per point, with equal thermodynamic length between steps.

    ``spread[:, t]`` is Var(log γ - log q0) over a pilot's chains at the positions weighing
    step t of the pilot's schedule ``betas`` ``[B, T + 1]``: a step Δβ there adds Δβ² times it
    to the variance of the log-weights. With λ = its square root (plus 5% of its mean, so
    that no stretch is skipped), the new β_j solves Λ(β_j) = j/T, Λ the normalized
    cumulative Σ Δβ λ, linear between the pilot's steps (Gelman & Meng 1998; the equal-
    variance rule of adaptive tempering, Jasra et al. 2011).
    """
    points, width = betas.shape
    steps = width - 1
    density = spread[:, 1:].clamp(min=0).sqrt()
    density = density + FITTED_FLOOR * tree_sum(density)[:, None] / steps + torch.finfo(torch.float64).tiny
    length = torch.cumsum(density * (betas[:, 1:] - betas[:, :-1]), dim=1)
    cumulative = torch.cat([torch.zeros_like(length[:, :1]), length / length[:, -1:]], dim=1)
    wanted = (torch.arange(width, dtype=torch.float64, device=betas.device) / steps).expand(points, -1).contiguous()
    above = torch.searchsorted(cumulative.contiguous(), wanted).clamp(1, steps)
    low, high = cumulative.gather(1, above - 1), cumulative.gather(1, above)
    share = ((wanted - low) / (high - low)).clamp(0, 1)
    start, end = betas.gather(1, above - 1), betas.gather(1, above)
    fitted = start + share * (end - start)
    fitted[:, 0], fitted[:, -1] = 0.0, 1.0
    return fitted


class Streams(NamedTuple):
    """The ``rng`` streams one run draws from: initial states (and a prior mixture's component), momenta, acceptance tests."""

    init: int
    component: int
    momentum: int
    accept: int


FORWARD = Streams(1, 2, 3, 4)
PILOT = Streams(5, 6, 7, 8)
PILOT_PRIOR = Streams(14, 15, 16, 17)  # --init auto's second pilot, from the prior
REVERSE = Streams(0, 0, 9, 10)  # reverse chains start from the simulated z: no initial draws
SIMULATE = Streams(11, 12, 0, 0)  # z ~ p(z) of simulated points
SIMULATE_X = 13  # x ~ p(x|z), one uniform per data dimension


@dataclass
class State:
    """Log-densities and gradients at the chains' positions, ``[B, C]`` and ``[B, C, L]`` float64.

    ``log_target`` is log γ(z) = log p(z) + log p(x|z); ``log_init`` is log q0(z).
    """

    log_target: torch.Tensor
    grad_target: torch.Tensor
    log_init: torch.Tensor
    grad_init: torch.Tensor

    def log_f(self, beta: torch.Tensor) -> torch.Tensor:
        """log f_β per chain, β ``[B]`` per point."""
        beta = beta[:, None]
        return (1 - beta) * self.log_init + beta * self.log_target

    def grad_f(self, beta: torch.Tensor) -> torch.Tensor:
        return grad_f(beta, self.grad_init, self.grad_target)

    def where(self, keep_other: torch.Tensor, other: State) -> State:
        """``other`` where ``keep_other [B, C]``, else this state."""
        wide = keep_other[..., None]
        return State(
            torch.where(keep_other, other.log_target, self.log_target),
            torch.where(wide, other.grad_target, self.grad_target),
            torch.where(keep_other, other.log_init, self.log_init),
            torch.where(wide, other.grad_init, self.grad_init),
        )


def grad_f(beta: torch.Tensor, grad_init: torch.Tensor, grad_target: torch.Tensor) -> torch.Tensor:
    """∇ log f_β = (1 - β) ∇ log q0 + β ∇ log γ per chain, β ``[B]`` per point."""
    beta = beta[:, None, None]
    return (1 - beta) * grad_init + beta * grad_target


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_prob_and_grad(distribution: Distribution, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``distribution.log_prob(z)`` and its gradient in z, for z ``[..., L]`` (float64, no graph kept).

    Diagonal Gaussians in closed form; anything else through autograd.
    """
    if type(distribution) is Independent and type(distribution.base_dist) is Normal:  # not a subclass: its own log_prob
        if distribution.reinterpreted_batch_ndims == 1:
            base = distribution.base_dist
            standardized = (z - base.loc) / base.scale
            log_p = tree_sum(-0.5 * standardized * standardized - torch.log(base.scale) - _HALF_LOG_2PI)
            return log_p, -standardized / base.scale
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        log_p = log_prob64(distribution, z) if isinstance(distribution, Distribution) else distribution.log_prob(z)
        (grad,) = torch.autograd.grad(log_p.sum(), z)
    return log_p.detach(), grad


class PointsFirst:
    """q(z|x) of batch ``[B]`` read at ``z [B, C, L]`` (chains second), as ``Target`` evaluates it."""

    def __init__(self, distribution: Distribution) -> None:
        self.distribution = distribution

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return log_prob64(self.distribution, z.transpose(0, 1)).transpose(0, 1)


class Target:
    """log q0, log γ = log p(z) + log p(x|z) and their gradients for a batch of points.

    Args:
        model: the model (its decoder computes without weight gradients).
        x: ``[B, *input_shape]`` float32, the points.
        bins: score a continuous likelihood on this grid's bins (the gradient
            flows through the bin log-probability), or None.
        init: q0 with batch shape ``[B, 1]`` and event shape ``[L]``, or None for the prior.
        prior: p(z), event shape ``[L]``.
    """

    def __init__(
        self,
        model: Model,
        x: torch.Tensor,
        bins: Grid | None,
        init: Distribution | PointsFirst | None,
        prior: Distribution,
        covariates: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.model, self.x, self.bins, self.init, self.prior = model, x[:, None], bins, init, prior
        self.covariates = dict(covariates or {})
        self.from_prior: torch.Tensor | None = None  # [B] bool: points whose q0 is the prior instead (--init auto)
        self.shortcut = None
        parts = model.linear_head()
        if parts is not None and bins is None and model.likelihood.linear_shortcut:
            trunk, head = parts
            flat = x.reshape(x.shape[0], -1)
            projected, offset = rows_independently(lambda rows: model.likelihood.linear_projection(rows, head), flat)
            self.shortcut = (trunk, head, flat[:, None], projected, offset)

    def evaluate(self, z: torch.Tensor) -> State:
        """The state at positions ``z [B, C, L]`` (float64 values exact in float32)."""
        points, chains, latent = z.shape
        decoded = z.to(torch.float32).reshape(points * chains, latent).requires_grad_(True)
        if self.model.general:
            log_likelihood, grad = self._through_distributions(decoded, points, chains)
        elif self.shortcut is None:
            log_likelihood, grad = self._through_decoder(decoded, points, chains)
        else:
            log_likelihood, grad = self._through_head(decoded, points, chains)
        return self._state(z, log_likelihood, grad)

    def gradients(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """∇ log γ and ∇ log q0 at ``z [B, C, L]``, without the values where the likelihood can skip them
        (``Likelihood.grad``): what HMC's inner leapfrog steps read."""
        points, chains, latent = z.shape
        if self.model.general or self.shortcut is not None:
            state = self.evaluate(z)
            return state.grad_target, state.grad_init
        decoded = z.to(torch.float32).reshape(points * chains, latent).requires_grad_(True)
        state = self._state(z, None, self._through_decoder(decoded, points, chains, values=False)[1])
        return state.grad_target, state.grad_init

    def _state(self, z: torch.Tensor, log_likelihood: torch.Tensor | None, grad: torch.Tensor) -> State:
        """The state from the likelihood's part (``log_likelihood`` None: the gradients alone are meant)."""
        points, chains, latent = z.shape
        log_prior, grad_prior = self._log_prob_and_grad("prior()", self.prior, z)
        if self.init is None:
            log_init, grad_init = log_prior, grad_prior
        else:
            log_init, grad_init = self._log_prob_and_grad(f"{getattr(self.model.encoder, 'method', 'encode')}(x)", self.init, z)
            if self.from_prior is not None:
                log_init = torch.where(self.from_prior[:, None], log_prior, log_init)
                grad_init = torch.where(self.from_prior[:, None, None], grad_prior, grad_init)
        grad_likelihood = grad.reshape(points, chains, latent).double()
        log_target = log_prior if log_likelihood is None else log_prior + log_likelihood
        return State(log_target, grad_prior + grad_likelihood, log_init, grad_init)

    def _log_prob_and_grad(self, what: str, distribution: Distribution | PointsFirst, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_prob_and_grad``; for a model's own distributions, a failure is one error naming them."""
        if not self.model.general:
            return log_prob_and_grad(distribution, z)
        name = type(getattr(distribution, "distribution", distribution)).__name__
        hint = ""
        if flows(getattr(distribution, "distribution", distribution)):
            hint = " (AIS needs the log-density at any z, so the flow's inverse; or start from the prior: --init prior)"
        try:
            return log_prob_and_grad(distribution, z)
        except VaeevalError:
            raise
        except Exception as error:  # the user's distribution: any failure is reported, in one line
            raise VaeevalError(f"{what}'s {name}.log_prob raised {first_line(error)}{where(error)}{hint}") from None

    def _through_distributions(self, decoded: torch.Tensor, points: int, chains: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) ``[B, C]`` and its gradient in z for a model of the general path, through autograd."""
        x = self.x[:, 0].repeat_interleave(chains, dim=0)
        covariates = {name: value.repeat_interleave(chains, dim=0) for name, value in self.covariates.items()}
        with torch.enable_grad():
            log_likelihood = self.model.log_likelihood(decoded, x, covariates, self.bins)
            (grad,) = torch.autograd.grad(log_likelihood.sum(), decoded)
        return log_likelihood.detach().reshape(points, chains), grad

    def _through_decoder(
        self, decoded: torch.Tensor, points: int, chains: int, values: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """log p(x|z) ``[B, C]`` (None unless ``values``) and its gradient in the decoder's input: the
        likelihood's gradient, back through autograd."""
        covariates = {name: value.repeat_interleave(chains, dim=0) for name, value in self.covariates.items()}
        with torch.enable_grad():
            params = self.model.decode(decoded, covariates)
        shaped = params.detach().reshape(points, chains, *self.model.decode_shape)
        if values:
            log_likelihood, grad_params = self.model.likelihood.log_prob_and_grad(shaped, self.x, self.bins)
        else:
            log_likelihood, grad_params = None, self.model.likelihood.grad(shaped, self.x, self.bins)
        (grad,) = torch.autograd.grad(params, decoded, grad_outputs=grad_params.reshape(params.shape))
        return log_likelihood, grad

    def _through_head(self, decoded: torch.Tensor, points: int, chains: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same for a decoder ending in a linear layer: the last layer's product and gradient by hand."""
        trunk, head, x, projected, offset = self.shortcut
        with torch.enable_grad():
            hidden = rows_independently(trunk, decoded) if len(trunk) else decoded
        inputs = hidden.detach()
        logits = rows_independently(head, inputs).reshape(points, chains, -1)
        log_likelihood, grad_logits = self.model.likelihood.log_prob_and_grad_through_linear(
            inputs.reshape(points, chains, -1), logits, x, projected, offset
        )
        grad_hidden = rows_independently(lambda rows: rows @ head.weight, grad_logits.reshape(points * chains, -1))
        if not len(trunk):
            return log_likelihood, grad_hidden
        (grad,) = torch.autograd.grad(hidden, decoded, grad_outputs=grad_hidden)
        return log_likelihood, grad


def decodable(z: torch.Tensor) -> torch.Tensor:
    """``z`` rounded to the float32 value the decoder will see, kept in float64."""
    return z.to(torch.float32).to(torch.float64)


def chain_counters(step: int, chains: int, width: int) -> np.ndarray:
    """``[chains, width]`` rng counters of draw ``step`` of every chain (width numbers each)."""
    first = (np.uint64(step) << np.uint64(_CHAIN_BITS)) + np.arange(chains, dtype=np.uint64)
    return first[:, None] * np.uint64(width) + np.arange(width, dtype=np.uint64)[None, :]


def hmc(
    target: Target,
    z: torch.Tensor,
    state: State,
    beta: float | torch.Tensor,
    step_size: torch.Tensor,
    momentum: torch.Tensor,
    log_uniform: torch.Tensor,
    leapfrog: int,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State, torch.Tensor]:
    """One HMC transition leaving f_β invariant (Neal 2011, section 5.3.2.1).

    With ``scale`` s, the mass matrix is diag(1 / s²): the same leapfrog in the coordinates
    z / s, where f_β's widths are about 1 when s are its standard deviations (Neal 2011,
    section 4.1), so one ε suits every direction.

    Args:
        target: the densities.
        z: ``[B, C, L]`` the chains' positions, ``state`` the densities there.
        beta: the path's β, one for every point or ``[B]``.
        step_size: ``[B]`` ε per point.
        momentum: ``[B, C, L]`` N(0, I) draws.
        log_uniform: ``[B, C]`` log U(0, 1) draws for the acceptance tests.
        leapfrog: L, leapfrog steps.
        scale: ``[B, L]`` s per point, or None: the identity mass matrix.

    Returns:
        The new positions, their state and ``[B, C]`` booleans: which proposals were accepted.
        A proposal whose density is not finite is rejected.
    """
    if not isinstance(beta, torch.Tensor):
        beta = torch.full((z.shape[0],), float(beta), dtype=torch.float64, device=z.device)
    epsilon = step_size[:, None, None] if scale is None else step_size[:, None, None] * scale[:, None]
    p = momentum + 0.5 * epsilon * state.grad_f(beta)
    proposal = z
    for _ in range(leapfrog - 1):  # the inner steps read gradients alone
        proposal = decodable(proposal + epsilon * p)
        grad_target, grad_init = target.gradients(proposal)
        p = p + epsilon * grad_f(beta, grad_init, grad_target)
    proposal = decodable(proposal + epsilon * p)
    proposed = target.evaluate(proposal)
    p = p + 0.5 * epsilon * proposed.grad_f(beta)
    before = state.log_f(beta) - 0.5 * tree_sum(momentum * momentum)
    after = proposed.log_f(beta) - 0.5 * tree_sum(p * p)
    accepted = log_uniform < after - before  # NaN compares False: rejected
    return torch.where(accepted[..., None], proposal, z), state.where(accepted, proposed), accepted


@dataclass(frozen=True)
class Chains:
    """What one annealing run found, per point and chain.

    ``log_weight`` is Σ_t (β_t - β_{t-1}) (log γ - log q0) along each chain, ``[B, C]``;
    ``accepted`` the number of accepted HMC proposals per point, ``[B]``; ``step_sizes``
    ``[B, T + 1]`` the ε of the transition targeting f_t (column t, 1 <= t < T);
    ``spread`` ``[B, T + 1]`` (a pilot run's, else None): column t the variance over the
    point's chains of log γ - log q0 at the positions that weigh step t.
    """

    log_weight: torch.Tensor
    accepted: torch.Tensor
    step_sizes: torch.Tensor
    spread: torch.Tensor | None = None


def per_point(betas: np.ndarray | torch.Tensor, points: int, device: torch.device) -> torch.Tensor:
    """A schedule ``[T + 1]`` shared by every point, or one per point, as ``[B, T + 1]`` float64."""
    betas = torch.as_tensor(betas, dtype=torch.float64, device=device)
    return betas.expand(points, -1) if betas.dim() == 1 else betas


def anneal(
    target: Target,
    z: torch.Tensor,
    betas: np.ndarray | torch.Tensor,
    step_sizes: torch.Tensor,
    *,
    seed: int,
    indices: np.ndarray,
    streams: Streams,
    leapfrog: int,
    scale: torch.Tensor | None = None,
    reverse: bool = False,
    adapt: bool = False,
    tick: Callable[[], None] | None = None,
) -> Chains:
    """Run the chains along the path, forward (β from 0 to 1) or in reverse.

    Forward, ``z`` are draws from q0: for t = 1..T the weight takes the increment at the
    current position, then (t < T) an HMC transition targets f_t. In reverse, ``z`` are
    posterior samples: for t = T..1 the increment, then (t > 1) a transition targeting f_{t-1}.

    Args:
        target: the densities.
        z: ``[B, C, L]`` the starting positions (exact in float32).
        betas: the schedule, ``[T + 1]`` for every point or ``[B, T + 1]`` one per point.
        step_sizes: ``[B, T + 1]`` ε per point for the transition targeting f_t; with
            ``adapt``, only column 1 is read and the rest is filled in.
        seed, indices, streams: where the momenta and acceptance draws come from.
        leapfrog: leapfrog steps per transition.
        scale: ``[B, L]`` the diagonal mass matrix's 1 / sqrt per point (``hmc``), or None.
        reverse: run from β = 1 to 0.
        adapt: tune ε toward the target acceptance rate as the chains go (a pilot run):
            after the transition at f_t, ε for f_{t+1} is ε_t × 1.02 if the point's chains
            accepted more than 65% of their proposals, else × 0.98, clipped to ``ranges``;
            and record the spread of the weight increments (``Chains.spread``).
        tick: called after each step (for a progress bar).
    """
    points, chains, latent = z.shape
    betas = per_point(betas, points, z.device)
    steps = betas.shape[1] - 1
    step_sizes = step_sizes.clone()
    low, high = STEP_SIZE_RANGE if scale is None else SCALED_STEP_SIZE_RANGE
    state = target.evaluate(z)
    log_weight = torch.zeros(points, chains, dtype=torch.float64, device=z.device)
    accepted = torch.zeros(points, dtype=torch.float64, device=z.device)
    spread = torch.zeros(points, steps + 1, dtype=torch.float64, device=z.device) if adapt else None
    for t in range(steps, 0, -1) if reverse else range(1, steps + 1):
        increment = state.log_target - state.log_init
        log_weight += (betas[:, t] - betas[:, t - 1])[:, None] * increment
        if spread is not None and chains > 1:
            centred = increment - tree_sum(increment)[:, None] / chains
            spread[:, t] = tree_sum(centred * centred) / (chains - 1)
        k = t - 1 if reverse else t  # the transition that follows targets f_k
        if tick is not None:
            tick()
        if k in (0, steps):
            continue
        momentum = rng.normal(seed, indices, chain_counters(k, chains, latent), streams.momentum).to(z.device)
        log_uniform = torch.from_numpy(
            numerics.log(rng.uniform(seed, indices, chain_counters(k, chains, 1)[:, 0], streams.accept))
        ).to(z.device)
        z, state, moved = hmc(target, z, state, betas[:, k], step_sizes[:, k], momentum, log_uniform, leapfrog, scale=scale)
        accepted += moved.sum(1)
        if adapt and k + 1 < steps:
            rate = tree_sum(moved.double()) / chains
            factor = torch.full_like(rate, ADAPT_DOWN).masked_fill_(rate > TARGET_ACCEPTANCE, ADAPT_UP)
            step_sizes[:, k + 1] = (step_sizes[:, k] * factor).clamp(low, high)
    return Chains(log_weight, accepted, step_sizes, spread)


def prior_draws(prior: Prior, seed: int, indices: np.ndarray, chains: int, streams: Streams, device: torch.device) -> torch.Tensor:
    """``[B, C, L]`` draws from the prior, keyed by point and chain, exact in float32."""
    normal = rng.normal(seed, indices, chain_counters(0, chains, prior.noise_width), streams.init).to(device)
    component = torch.from_numpy(rng.uniform(seed, indices, chain_counters(0, chains, 1)[:, 0], streams.component))
    return decodable(prior.sample(normal, component.to(device)))


def gaussian_draws(
    mean: torch.Tensor, std: torch.Tensor, seed: int, indices: np.ndarray, chains: int, streams: Streams
) -> torch.Tensor:
    """``[B, C, L]`` draws from N(mean, diag std²) (``mean``, ``std`` ``[B, L]``), keyed by point and chain."""
    normal = rng.normal(seed, indices, chain_counters(0, chains, mean.shape[-1]), streams.init).to(mean.device)
    return decodable(mean[:, None] + std[:, None] * normal)


def log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    """log (1/C) Σ_c exp(values[..., c]), ``[..., C] -> [...]``."""
    return numerics.logsumexp(values) - math.log(values.shape[-1])
