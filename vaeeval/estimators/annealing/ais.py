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

Mass matrix: ``identity`` (the papers' HMC), or ``diagonal``: diag(1 / σ²) per point with σ
q0's standard deviations, so ε is in units of σ (clipped to [1e-4, 2]).

Schedule ``adaptive``: the pilot anneals on the sigmoid schedule and records, per point and
step, the variance over its chains of the weight increment's integrand log γ − log q0; the
reported run's β are placed so that every step carries the same share of the path's
thermodynamic length ∫ sd_β(log γ − log q0) dβ (the step variances Δβ² Var_β then equal:
Gelman & Meng 1998; adaptive tempering as in SMC samplers), and ε is read from the pilot at
the nearest β. The schedule, like ε, comes from the pilot's chains alone and is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Independent, Normal

from vaeeval.core import numerics
from vaeeval.core.numerics import tree_sum
from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.annealing.kernel import (
    FORWARD,
    PILOT,
    PILOT_PRIOR,
    SCALED_STEP_SIZE_RANGE,
    SCHEDULES,
    STEP_SIZE_RANGE,
    Chains,
    PointsFirst,
    Streams,
    Target,
    anneal,
    fitted_schedule,
    log_mean_exp,
    per_point,
    schedule,
)
from vaeeval.estimators.annealing.start import Start
from vaeeval.estimators.importance.evaluate import MAX_BATCH_SIZE, EvaluationOptions, Evaluator, batch_within
from vaeeval.estimators.weights import effective_sample_size, iwae_stderr
from vaeeval.format.data import Dataset
from vaeeval.format.model import Model
from vaeeval.results.numbers import AISCost, AISEvaluation, AISPointResults, AISSettings, PointResults, summarize_ais
from vaeeval.user.distributions import in_float64

AUTO = "auto"  # q0 chosen per point by the pilot: the encoder's q(z|x) or the prior
INITS = ("encoder", "prior", AUTO)
MASSES = ("identity", "diagonal")
ADAPTIVE = "adaptive"  # the schedule fitted in the pilot
SCHEDULE_CHOICES = (*SCHEDULES, ADAPTIVE)
DEFAULT_STEPS = 500
DEFAULT_LEAPFROG = 10
DEFAULT_CHAINS = 12  # with two pilots of 4 chains: the gradient evaluations of the former 16 chains and one pilot
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
        init: ``encoder`` (q0 = q(z|x)), ``prior`` (q0 = p(z)) or ``auto``: a pilot from each, and
            per point the prior where its pilot's mean log-weight was higher by a quarter nat (``prior_is_better``;
            frozen, like ε).
        schedule: ``sigmoid``, ``linear`` or ``geometric`` spacing of β.
        step_size: a fixed HMC step size ε; None tunes it per point in a pilot run.
        pilot_chains: chains per point in the pilot run.
        batch_size: points annealed together; None fits about 2048 chains in the memory budget.
    """

    steps: int = DEFAULT_STEPS
    leapfrog: int = DEFAULT_LEAPFROG
    chains: int = DEFAULT_CHAINS
    init: str = AUTO
    schedule: str = "sigmoid"
    step_size: float | None = None
    pilot_chains: int = DEFAULT_PILOT_CHAINS
    batch_size: int | None = None
    mass: str = "identity"

    @property
    def pilots(self) -> int:
        """Pilot runs per point: none for fixed settings, one tuning ε or the schedule, two with ``init="auto"``."""
        if self.init == AUTO:
            return 2
        return int(self.step_size is None or self.schedule == ADAPTIVE)

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
        if self.schedule not in SCHEDULE_CHOICES:
            raise VaeevalError(f"{option('schedule')} {self.schedule!r}: choose one of {', '.join(SCHEDULE_CHOICES)}")
        if self.mass not in MASSES:
            raise VaeevalError(f"{option('mass')} {self.mass!r}: choose one of {', '.join(MASSES)}")
        low, high = STEP_SIZE_RANGE if self.mass == "identity" else SCALED_STEP_SIZE_RANGE
        if self.step_size is not None and not (low <= self.step_size <= high):
            raise VaeevalError(f"{option('step_size')} {self.step_size}: choose a step size in [{low:g}, {high:g}]"
                               + ("" if self.mass == "identity" else " (units of q0's standard deviations, --mass diagonal)"))
        if self.schedule == ADAPTIVE and self.pilot_chains < 2:
            raise VaeevalError(f"{option('schedule')} adaptive places β by the variance over the pilot's chains: "
                               f"{option('pilot_chains')} must be at least 2, found {self.pilot_chains}")
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
        self.betas = schedule("sigmoid" if ais.schedule == ADAPTIVE else ais.schedule, ais.steps)  # adaptive: the pilot's
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
            mass=ais.mass,
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
        pilot = self.ais.pilots * self.ais.pilot_chains * per_chain
        return AISCost(pilot=pilot, run=self.ais.chains * per_chain * self._runs_per_point)

    _runs_per_point = 1

    def _ticks(self, progress: Callable[[float], None] | None, done: int, points: int) -> Callable[[], None] | None:
        """A per-step callback reporting points done, in fractions of this batch of ``points``."""
        if progress is None:
            return None
        runs = self._runs_per_point + self.ais.pilots
        total, steps = runs * self.ais.steps, [0]

        def tick() -> None:
            steps[0] += 1
            progress(done + points * min(steps[0] / total, 1.0))

        return tick

    def _annealed(
        self, indices: np.ndarray | None, progress: Callable[[int], None] | None
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, Target, Tuning, Chains, Callable[[], None]]]:
        """Per batch: its rows, points, target, frozen tuning, forward chains and progress tick; progress is
        reported once the caller has taken the batch."""
        done = 0
        with torch.no_grad():
            for rows, x, covariates in self._batches(indices):
                tick = self._ticks(progress, done, rows.size)
                target, start = self._target(x, covariates)
                tuning = self._tuning(target, start, rows, tick)
                yield rows, x, target, tuning, self._forward(target, start, rows, tuning, tick), tick
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
            start = Start(self.model, self._start_init, self.settings.seed, posterior=q, like=x)
            init = None if self.ais.init == "prior" else PointsFirst(q)
            return Target(model, x, self.scoring.bins, init, prior, covariates), start
        mean, log_var = model.encode(x, covariates)
        mean, std = mean.double(), (0.5 * log_var.double()).exp()
        prior = model.prior.distribution(mean)
        init = None if self.ais.init == "prior" else Independent(Normal(mean[:, None], std[:, None], validate_args=False), 1)
        target = Target(model, x, self.scoring.bins, init, prior, covariates)
        return target, Start(model, self._start_init, self.settings.seed, mean, std, like=x)

    @property
    def _start_init(self) -> str:
        return "encoder" if self.ais.init == AUTO else self.ais.init

    def _tuning(self, target: Target, start: Start, rows: np.ndarray, tick: Callable[[], None] | None) -> Tuning:
        """The frozen settings of every transition: the schedule, ε per point and step, the mass matrix, and
        (``init="auto"``) each point's q0, set on ``target`` and ``start``.

        Pilot runs (their own noise streams) tune ε, place β for the adaptive schedule and choose q0.
        """
        points, steps, device = rows.size, self.ais.steps, target.x.device
        betas = per_point(self.betas, points, device)
        fixed = torch.full((points, steps + 1), self.ais.step_size or 0.0, dtype=torch.float64, device=device)
        if not self.ais.pilots:
            scale = start.stds(start.draw(rows, self.ais.pilot_chains, PILOT_PRIOR if self.ais.init == "prior" else PILOT)) \
                if self.ais.mass == "diagonal" else None
            return Tuning(betas, fixed, scale)
        if self.ais.init == AUTO:
            runs = []
            for from_prior, streams in ((False, PILOT), (True, PILOT_PRIOR)):
                target.from_prior = start.from_prior = torch.full((points,), from_prior, device=device)
                runs.append(self._pilot(target, start, rows, betas, streams, tick))
            choice = prior_is_better(runs[0][1].log_weight, runs[1][1].log_weight)
            target.from_prior = start.from_prior = choice
            (scale, encoder), (_, prior) = runs
            if scale is not None:
                scale = torch.where(choice[:, None], runs[1][0], scale)
            pilot = Chains(encoder.log_weight, encoder.accepted, torch.where(choice[:, None], prior.step_sizes, encoder.step_sizes),
                           torch.where(choice[:, None], prior.spread, encoder.spread))
        else:
            scale, pilot = self._pilot(target, start, rows, betas, PILOT_PRIOR if self.ais.init == "prior" else PILOT, tick)
        step_sizes = pilot.step_sizes if self.ais.step_size is None else fixed
        if self.ais.schedule != ADAPTIVE:
            return Tuning(betas, step_sizes, scale)
        fitted = fitted_schedule(betas, pilot.spread)
        # ε of the pilot's transition at the nearest β at or above each new β (columns 1 .. T - 1)
        column = torch.searchsorted(betas.contiguous(), fitted.contiguous()).clamp(1, max(steps - 1, 1))
        return Tuning(fitted, step_sizes.gather(1, column), scale)

    def _pilot(self, target: Target, start: Start, rows: np.ndarray, betas: torch.Tensor, streams: Streams,
               tick: Callable[[], None] | None) -> tuple[torch.Tensor | None, Chains]:
        """A pilot run from q0 as ``start`` stands: the mass matrix's scale (or None) and the pilot's chains."""
        z = start.draw(rows, self.ais.pilot_chains, streams)
        scale = start.stds(z) if self.ais.mass == "diagonal" else None
        step_sizes = torch.zeros_like(betas)
        widths = start.stds(z) if scale is None else torch.ones_like(scale)
        step_sizes[:, 1] = (0.5 * widths.min(-1).values).clamp(*(STEP_SIZE_RANGE if scale is None else SCALED_STEP_SIZE_RANGE))
        return scale, anneal(target, z, betas, step_sizes, seed=self.settings.seed, indices=rows, streams=streams,
                             leapfrog=self.ais.leapfrog, scale=scale, adapt=True, tick=tick)

    def _forward(self, target: Target, start: Start, rows: np.ndarray, tuning: Tuning, tick: Callable[[], None] | None) -> Chains:
        z = start.draw(rows, self.ais.chains, FORWARD)
        return tuning.anneal(target, z, seed=self.settings.seed, indices=rows, streams=FORWARD,
                             leapfrog=self.ais.leapfrog, tick=tick)

    def _beside(self, rows: np.ndarray) -> PointResults:
        """The ordinary importance-sampling estimates of these points."""
        return PointResults.concatenate([part.points for part in self.importance.parts(rows)])

    def _from_prior(self, target: Target, points: int) -> np.ndarray:
        """``[B]`` bool: where the chains started from p(z) (``--init auto``'s choice, else the same for all)."""
        if target.from_prior is not None:
            return target.from_prior.cpu().numpy().copy()
        return np.full(points, self.ais.init == "prior")

    def _acceptance(self, *runs: Chains) -> np.ndarray:
        transitions = max(self.ais.steps - 1, 0) * self.ais.chains * len(runs)
        if transitions == 0:
            return np.full(runs[0].accepted.shape, math.nan)
        return (sum(run.accepted for run in runs) / transitions).cpu().numpy()

    def _mean_step_size(self, step_sizes: torch.Tensor) -> np.ndarray:
        inner = step_sizes[:, 1 : self.ais.steps]
        return (tree_sum(inner) / inner.shape[1] if inner.shape[1] else torch.full_like(step_sizes[:, 0], math.nan)).cpu().numpy()


# nats by which the prior's pilot must beat the encoder's mean log-weight. Chosen on 100 points simulated from
# each sample model (seed 0; benchmarks/ais_defaults.py --starts), checked on another 100 (seed 1): a margin of
# half a standard error (the former rule) let a third of the points whose pilots differ by noise start from the
# prior (categorical model's BDMC gap 0.052, 0.20 on those points) and kept failing encoder starts whose chains
# agree with each other (continuous Bernoulli 0.56); 0.25 nats gave 0.01-0.25, 0 nats about the same.
AUTO_MARGIN = 0.25


def prior_is_better(encoder: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: where the pilot from the prior had a higher mean log-weight than the one from
    q(z|x) (``[B, C]`` each) by more than ``AUTO_MARGIN`` nats.

    A chain's E[log w] is log p(x) minus the KL divergence between the forward and the reverse
    annealing processes, so the start with the higher mean log-weight anneals closer to the
    posterior; a log-mean-exp over a pilot's few chains would follow their luckiest chain. The
    margin, in nats (a pilot's few chains do not estimate their own spread well: chains stuck
    together look certain), keeps q(z|x) where the two anneal about equally well.
    """
    chains = encoder.shape[1]
    return tree_sum(prior) / chains - tree_sum(encoder) / chains > AUTO_MARGIN


@dataclass(frozen=True)
class Tuning:
    """What every transition of a point's chains uses, frozen before the reported run.

    ``betas`` ``[B, T + 1]`` the schedule; ``step_sizes`` ``[B, T + 1]`` ε of the transition
    targeting f_t; ``scale`` ``[B, L]`` the diagonal mass matrix's 1 / sqrt (None: identity).
    """

    betas: torch.Tensor
    step_sizes: torch.Tensor
    scale: torch.Tensor | None

    def anneal(self, target: Target, z: torch.Tensor, **how) -> Chains:
        return anneal(target, z, self.betas, self.step_sizes, scale=self.scale, **how)


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
        for rows, _, target, tuning, forward, _ in self._annealed(indices, progress):
            yield AISPart(self._points(rows, forward, tuning.step_sizes, self._from_prior(target, rows.size)))

    def _points(self, rows: np.ndarray, forward: Chains, step_sizes: torch.Tensor, from_prior: np.ndarray) -> AISPointResults:
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
            from_prior=from_prior,
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
    init: str = AUTO,
    schedule: str = "sigmoid",
    step_size: float | None = None,
    pilot_chains: int = DEFAULT_PILOT_CHAINS,
    batch_size: int | None = None,
    mass: str = "identity",
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
    annealing = AISOptions(steps, leapfrog, chains, init, schedule, step_size, pilot_chains, batch_size, mass)
    options = EvaluationOptions(samples=samples, seed=seed, max_memory=max_memory, device=device,
                                discretize=discretize, density=density, grid_range=grid_range)
    return AISEvaluator(model, data, annealing, options).evaluate(progress)
