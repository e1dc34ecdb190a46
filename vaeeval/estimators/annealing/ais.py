"""Tight log-likelihoods: annealed importance sampling (AIS; Neal 2001) of every point's posterior.

``AISEvaluator`` estimates log p(x) per point by AIS with HMC transitions (``kernel``),
with the ordinary ELBO and IWAE of the same point beside it; ``bdmc`` certifies it
(Wu, Burda, Salakhutdinov & Grosse 2017).

Step sizes: ``step_size`` fixes ε; otherwise a pilot run of ``pilot_chains`` chains per point
adapts ε toward an acceptance rate of 0.65 as it anneals (ε × 1.02 above, × 0.98 below,
clipped to [1e-4, 0.5]; Wu et al. 2017), starting from half the smallest standard deviation
of q0, and the run whose weights are reported uses the pilot's ε for each point and step,
frozen (as Huang et al. 2020 do): its transitions then do not depend on its own chains, and
its weights stay unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Distribution, Independent, Normal

from vaeeval.core import numerics, rng
from vaeeval.core.numerics import tree_sum
from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.annealing.kernel import (
    FORWARD,
    PILOT,
    SCHEDULES,
    STEP_SIZE_RANGE,
    Chains,
    PointsFirst,
    Streams,
    Target,
    anneal,
    chain_counters,
    decodable,
    gaussian_draws,
    log_mean_exp,
    prior_draws,
    schedule,
)
from vaeeval.estimators.importance.evaluate import MAX_BATCH_SIZE, EvaluationOptions, Evaluator, batch_within
from vaeeval.estimators.weights import effective_sample_size, iwae_stderr
from vaeeval.format.data import Dataset
from vaeeval.format.model import Model
from vaeeval.results.numbers import AISCost, AISEvaluation, AISPointResults, AISSettings, PointResults, summarize_ais
from vaeeval.user.distributions import draw, in_float64, moments, noise_width

INITS = ("encoder", "prior")
DEFAULT_STEPS = 500
DEFAULT_LEAPFROG = 10
DEFAULT_CHAINS = 16
DEFAULT_PILOT_CHAINS = 4
TARGET_ROWS = 2048  # chains x points per decoder call
MAX_STEPS = 1_000_000
MAX_CHAINS = 1_000_000
MAX_LEAPFROG = 10_000
MAX_SIMULATED = 10_000_000
_KEPT_FOR_GRADIENTS = 3  # a gradient's working set, in forward working sets


@dataclass(frozen=True)
class AISOptions:
    """How to anneal.

    Attributes:
        steps: T, the number of steps from q0 to the posterior (T - 1 HMC transitions).
        leapfrog: leapfrog steps per HMC transition.
        chains: C, independent chains per point.
        init: ``encoder`` (q0 = q(z|x)) or ``prior`` (q0 = p(z)).
        schedule: ``sigmoid``, ``linear`` or ``geometric`` spacing of β.
        step_size: a fixed HMC step size ε; None tunes it per point in a pilot run.
        pilot_chains: chains per point in the pilot run.
        batch_size: points annealed together; None fits about 2048 chains in the memory budget.
    """

    steps: int = DEFAULT_STEPS
    leapfrog: int = DEFAULT_LEAPFROG
    chains: int = DEFAULT_CHAINS
    init: str = "encoder"
    schedule: str = "sigmoid"
    step_size: float | None = None
    pilot_chains: int = DEFAULT_PILOT_CHAINS
    batch_size: int | None = None

    def check(self) -> None:
        """Raise ``VaeevalError`` naming the first option out of range."""
        for name in ("steps", "leapfrog", "chains", "pilot_chains"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise VaeevalError(f"{option(name)} must be an integer of at least 1, found {value!r}")
        for name, largest in (("steps", MAX_STEPS), ("chains", MAX_CHAINS), ("pilot_chains", MAX_CHAINS),
                              ("leapfrog", MAX_LEAPFROG)):
            if getattr(self, name) > largest:
                raise VaeevalError(f"{option(name)} {getattr(self, name)} is more than {largest:,}")
        if self.init not in INITS:
            raise VaeevalError(f"{option('init')} {self.init!r}: choose one of {', '.join(INITS)}")
        if self.schedule not in SCHEDULES:
            raise VaeevalError(f"{option('schedule')} {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.step_size is not None and not (STEP_SIZE_RANGE[0] <= self.step_size <= STEP_SIZE_RANGE[1]):
            low, high = STEP_SIZE_RANGE
            raise VaeevalError(f"{option('step_size')} {self.step_size}: choose a step size in [{low:g}, {high:g}]")
        if self.batch_size is not None and self.batch_size < 1:
            raise VaeevalError(f"{option('batch_size')} must be at least 1, found {self.batch_size}")


def refuse_discrete(model: Model) -> None:
    """AIS and BDMC move z by HMC, along gradients of log p(x, z): a discrete latent has none.

    Raises:
        VaeevalError: the model's q(z|x) or p(z) has a discrete support.
    """
    found = getattr(model, "discrete_latent", None)
    if found:
        raise VaeevalError(
            f"the latent is discrete ({found}): AIS and BDMC anneal with HMC, which needs a continuous latent; "
            "vaeeval elbo --enumerate gives log p(x) exactly by summing over z's values"
        )


class _Annealer:
    """What AIS and BDMC share: options checked, the model on its device, the schedule, batching."""

    def __init__(self, model: Model, data: Dataset | np.ndarray, ais: AISOptions, options: EvaluationOptions) -> None:
        ais.check()
        refuse_discrete(model)
        self.ais = ais
        self.importance = Evaluator(model, data, options)  # the ELBO and IWAE beside, the scoring, the device
        self.model = self.importance.model
        self.dataset = self.importance.dataset
        self.scoring = self.importance.scoring
        self.betas = schedule(ais.schedule, ais.steps)
        rows = max(ais.chains, ais.pilot_chains)
        # the activations autograd keeps for the backward pass, besides the forward's working set
        fitting = batch_within(self.model, ais.batch_size or MAX_BATCH_SIZE, _KEPT_FOR_GRADIENTS * rows, options.max_memory)
        batch_size = fitting if ais.batch_size else max(1, min(TARGET_ROWS // rows, fitting))
        self.settings = AISSettings(
            steps=ais.steps,
            leapfrog=ais.leapfrog,
            chains=ais.chains,
            init=ais.init,
            schedule=ais.schedule,
            step_size=ais.step_size,
            pilot_chains=ais.pilot_chains,
            seed=self.importance.settings.seed,
            samples=self.importance.settings.samples,
            batch_size=batch_size,
            device=self.importance.settings.device,
        )

    @property
    def n(self) -> int:
        return self.importance.n

    @property
    def cost(self) -> AISCost:
        """Gradient evaluations per point: each transition costs ``leapfrog`` of them, per chain."""
        transitions = max(self.ais.steps - 1, 0)
        per_chain = 1 + transitions * self.ais.leapfrog
        pilot = 0 if self.ais.step_size is not None else self.ais.pilot_chains * per_chain
        return AISCost(pilot=pilot, run=self.ais.chains * per_chain * self._runs_per_point)

    _runs_per_point = 1

    def _ticks(self, progress: Callable[[float], None] | None, done: int, points: int) -> Callable[[], None] | None:
        """A per-step callback reporting points done, in fractions of this batch of ``points``."""
        if progress is None:
            return None
        runs = self._runs_per_point + (self.ais.step_size is None)
        total, steps = runs * self.ais.steps, [0]

        def tick() -> None:
            steps[0] += 1
            progress(done + points * min(steps[0] / total, 1.0))

        return tick

    def _annealed(
        self, indices: np.ndarray | None, progress: Callable[[int], None] | None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, Target, torch.Tensor, Chains, Callable[[], None]]]:
        """Per batch: its rows, points, target, step sizes, forward chains and progress tick; progress is
        reported once the caller has taken the batch."""
        done = 0
        with torch.no_grad():
            for rows, x, covariates in self._batches(indices):
                tick = self._ticks(progress, done, rows.size)
                target, start = self._target(x, covariates)
                step_sizes = self._step_sizes(target, start, rows, tick)
                yield rows, x, target, step_sizes, self._forward(target, start, rows, step_sizes, tick), tick
                done += rows.size
                if progress is not None:
                    progress(done)

    def _batches(self, indices: np.ndarray | None) -> Iterator[tuple[np.ndarray, torch.Tensor, dict[str, torch.Tensor]]]:
        indices = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64)
        for start in range(0, indices.size, self.settings.batch_size):
            rows = indices[start : start + self.settings.batch_size]
            x = torch.from_numpy(np.array(self.dataset.array[rows], dtype=np.float32)).to(self.settings.device)
            yield rows, x, self.dataset.covariates_of(rows, self.settings.device)

    def _target(self, x: torch.Tensor, covariates: dict[str, torch.Tensor]) -> tuple[Target, Start]:
        """The densities for these points, and q0."""
        model = self.model
        if model.general:
            q = in_float64(model.posterior(x, covariates))
            prior = model.prior.distribution(x)
            start = Start(self.model, self.ais.init, self.settings.seed, posterior=q, like=x)
            init = None if self.ais.init == "prior" else PointsFirst(q)
            return Target(model, x, self.scoring.bins, init, prior, covariates), start
        mean, log_var = model.encode(x, covariates)
        mean, std = mean.double(), (0.5 * log_var.double()).exp()
        prior = model.prior.distribution(mean)
        init = None if self.ais.init == "prior" else Independent(Normal(mean[:, None], std[:, None], validate_args=False), 1)
        target = Target(model, x, self.scoring.bins, init, prior, covariates)
        return target, Start(model, self.ais.init, self.settings.seed, mean, std, like=x)

    def _step_sizes(self, target: Target, start: Start, rows: np.ndarray, tick: Callable[[], None] | None) -> torch.Tensor:
        """ε per point and step ``[B, T + 1]``: fixed, or tuned by a pilot run."""
        points, steps, device = rows.size, self.ais.steps, target.x.device
        if self.ais.step_size is not None:
            return torch.full((points, steps + 1), self.ais.step_size, dtype=torch.float64, device=device)
        z = start.draw(rows, self.ais.pilot_chains, PILOT)
        step_sizes = torch.zeros(points, steps + 1, dtype=torch.float64, device=device)
        step_sizes[:, 1] = (0.5 * start.smallest_std(z)).clamp(*STEP_SIZE_RANGE)
        pilot = anneal(target, z, self.betas, step_sizes, seed=self.settings.seed, indices=rows, streams=PILOT,
                       leapfrog=self.ais.leapfrog, adapt=True, tick=tick)
        return pilot.step_sizes

    def _forward(
        self, target: Target, start: Start, rows: np.ndarray, step_sizes: torch.Tensor, tick: Callable[[], None] | None
    ) -> Chains:
        z = start.draw(rows, self.ais.chains, FORWARD)
        return anneal(target, z, self.betas, step_sizes, seed=self.settings.seed, indices=rows, streams=FORWARD,
                      leapfrog=self.ais.leapfrog, tick=tick)

    def _beside(self, rows: np.ndarray) -> PointResults:
        """The ordinary importance-sampling estimates of these points."""
        return PointResults.concatenate([part.points for part in self.importance.parts(rows)])

    def _acceptance(self, *runs: Chains) -> np.ndarray:
        transitions = max(self.ais.steps - 1, 0) * self.ais.chains * len(runs)
        if transitions == 0:
            return np.full(runs[0].accepted.shape, math.nan)
        return (sum(run.accepted for run in runs) / transitions).cpu().numpy()

    def _mean_step_size(self, step_sizes: torch.Tensor) -> np.ndarray:
        inner = step_sizes[:, 1 : self.ais.steps]
        return (tree_sum(inner) / inner.shape[1] if inner.shape[1] else torch.full_like(step_sizes[:, 0], math.nan)).cpu().numpy()


class Start:
    """q0, where every chain starts: q(z|x) (``init="encoder"``) or p(z), drawn keyed by point and chain.

    Args:
        model: the model.
        init: ``encoder`` or ``prior``.
        seed: the noise seed.
        mean, std: a diagonal q(z|x) ``[B, L]`` (format 1's path), or
        posterior: any q(z|x) of batch ``[B]`` (the general path).
        like: a tensor of the device to compute on.
    """

    def __init__(
        self,
        model: Model,
        init: str,
        seed: int,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        *,
        posterior: Distribution | None = None,
        like: torch.Tensor,
    ) -> None:
        self.model, self.init, self.seed = model, init, seed
        self.mean, self.std, self.posterior, self.device = mean, std, posterior, like.device

    def draw(self, rows: np.ndarray, chains: int, streams: Streams) -> torch.Tensor:
        """``[B, C, L]`` starting points, exact in float32."""
        if self.init == "prior":
            return prior_draws(self.model.prior, self.seed, rows, chains, streams, self.device)
        if self.posterior is None:
            return gaussian_draws(self.mean, self.std, self.seed, rows, chains, streams)
        width = noise_width(self.posterior)
        normal = rng.normal(self.seed, rows, chain_counters(0, chains, width), streams.init).to(self.device)
        uniform = torch.from_numpy(rng.uniform(self.seed, rows, chain_counters(0, chains, 1)[:, 0], streams.component))
        z = draw(self.posterior, normal.transpose(0, 1), uniform.to(self.device).transpose(0, 1), (self.seed, int(rows[0]), streams.init))
        return decodable(z.transpose(0, 1).double())

    def smallest_std(self, z: torch.Tensor) -> torch.Tensor:
        """q0's smallest standard deviation per point ``[B]`` (from the draws ``z [B, C, L]`` where it has none)."""
        if self.init == "encoder" and self.std is not None:
            return self.std.min(-1).values
        q0 = self.model.prior.distribution(z) if self.init == "prior" else self.posterior
        found = moments(q0)
        if found is not None:
            return found[1].double().sqrt().min(-1).values.expand(z.shape[0]).to(z.device)
        if z.shape[1] < 2:
            return torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
        deviations = z - tree_sum(z, dim=1)[:, None] / z.shape[1]
        return (tree_sum(deviations * deviations, dim=1) / (z.shape[1] - 1)).sqrt().min(-1).values


@dataclass(frozen=True)
class AISPart:
    """The AIS results for some of the points."""

    points: AISPointResults


class AISEvaluator(_Annealer):
    """An AIS run made ready: ``parts`` anneals any subset of the points, ``finish`` summarizes.

    Args:
        model: a loaded model.
        data: ``[N, *input_shape]`` points, already checked (``load_data``).
        ais: how to anneal.
        options: the importance-sampling run beside it (``samples``), the seed, the
            device, the memory budget and the scoring (``discretize``, ``density``).

    Raises:
        VaeevalError: bad options, naming the option.
    """

    def parts(self, indices: np.ndarray | None = None, progress: Callable[[int], None] | None = None) -> Iterator[AISPart]:
        """Anneal the points ``indices`` (default: all, in order), one batch per part."""
        for rows, _, _, step_sizes, forward, _ in self._annealed(indices, progress):
            yield AISPart(self._points(rows, forward, step_sizes))

    def _points(self, rows: np.ndarray, forward: Chains, step_sizes: torch.Tensor) -> AISPointResults:
        log_weight = forward.log_weight
        chains = log_weight.shape[1]
        log_sum = numerics.logsumexp(log_weight)
        ess = effective_sample_size(log_sum, numerics.logsumexp(2 * log_weight))
        stderr = iwae_stderr(ess, chains) if chains > 1 else torch.full_like(ess, math.nan)
        beside = self._beside(rows)
        ais = log_mean_exp(log_weight).cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(ais))
        if bad.size:
            raise VaeevalError(
                f"point {int(rows[bad[0]])}: ais is {ais[bad[0]]} ({bad.size} point(s) affected); every chain's weight "
                "overflowed (an extreme log-variance, logit or scale in the model's outputs)"
            )
        return AISPointResults(
            index=rows.copy(),
            ais=ais,
            ais_stderr=stderr.cpu().numpy(),
            ess=ess.cpu().numpy(),
            acceptance=self._acceptance(forward),
            step_size=self._mean_step_size(step_sizes),
            elbo=beside.elbo,
            iwae=beside.iwae,
            tokens=None if self.dataset.lengths is None else self.dataset.lengths[rows],
        )

    def finish(self, parts: Sequence[AISPart]) -> AISEvaluation:
        """One evaluation from parts covering each point once."""
        points = AISPointResults.concatenate([p.points for p in parts]).in_index_order()
        return AISEvaluation(
            points=points,
            summary=summarize_ais(points, self.model.data_dims),
            settings=self.settings,
            scoring=self.scoring,
            domain=self.importance.domain,
            cost=self.cost,
        )

    def evaluate(self, progress: Callable[[int], None] | None = None) -> AISEvaluation:
        """Every point, in one go."""
        return self.finish(list(self.parts(progress=progress)))


def evaluate_ais(
    model: Model,
    data: Dataset | np.ndarray,
    *,
    steps: int = DEFAULT_STEPS,
    leapfrog: int = DEFAULT_LEAPFROG,
    chains: int = DEFAULT_CHAINS,
    init: str = "encoder",
    schedule: str = "sigmoid",
    step_size: float | None = None,
    pilot_chains: int = DEFAULT_PILOT_CHAINS,
    batch_size: int | None = None,
    samples: int = 1000,
    seed: int = 0,
    max_memory: int = 512 * 2**20,
    device: str = "cpu",
    discretize: int | None = None,
    density: bool = False,
    grid_range: tuple[float, float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> AISEvaluation:
    """Estimate log p(x) of every point by AIS, with the ELBO and IWAE (K = ``samples``) beside it.

    See ``AISOptions`` for the annealing settings and ``EvaluationOptions`` for the rest.

    Raises:
        VaeevalError: bad settings, or a point whose every chain overflowed.
    """
    annealing = AISOptions(steps, leapfrog, chains, init, schedule, step_size, pilot_chains, batch_size)
    options = EvaluationOptions(samples=samples, seed=seed, max_memory=max_memory, device=device,
                                discretize=discretize, density=density, grid_range=grid_range)
    return AISEvaluator(model, data, annealing, options).evaluate(progress)
