"""``ais --target-gap``: find AIS settings whose BDMC gap is certified below a target, within a budget.

BDMC (``bdmc``) brackets log p(x) of points simulated from the model between forward
AIS (a stochastic lower bound) and reverse AIS from the true z (a stochastic upper
bound). ``certify`` runs it on the same ``n`` simulated points at growing settings: the
given (T, L), then T doubled each stage; when a doubling of T cut the mean gap by less
than a tenth, the next stage doubles L instead. It stops at the first stage whose
upper confidence bound on the mean gap, mean + 1.96 × stderr, is below the target, or
before the first stage that would take the cost past the budget. Every stage is an
ordinary BDMC run at frozen settings, keyed by the seed, so the certificate is
reproducible bit for bit; the AIS run on the data at the settings reached is an
ordinary AIS run at those settings.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.annealing.ais import MAX_LEAPFROG, MAX_SIMULATED, MAX_STEPS, AISOptions
from vaeeval.estimators.annealing.bdmc import BDMCEvaluator, simulate, simulation_grid
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.format.model import Model
from vaeeval.results.numbers import Evaluation

Z_UPPER = 1.96  # the one-sided bound is mean + 1.96 stderr (97.5%)
DEFAULT_CERTIFY_POINTS = 20
DEFAULT_MAX_COST = 10**9  # gradient evaluations: about eight stages from the default settings on 20 points
SUGGESTED_GAP = 0.5  # the --target-gap elbo's note suggests, nats per point
STILL_RISING = 0.1  # nats per point IWAE gained over the last tenfold of K: its convergence has not flattened
SLOW_GAIN = 0.9  # a doubling of T that leaves more than this share of the gap doubles L next


@dataclass(frozen=True)
class Stage:
    """One BDMC run of the certification: its settings, its mean gap and the gradient evaluations it took."""

    steps: int
    leapfrog: int
    gap: float
    stderr: float
    upper: float  # gap + Z_UPPER × stderr
    cost: int  # gradient evaluations, over all simulated points, pilot included
    seconds: float  # wall-clock time the stage took


@dataclass(frozen=True)
class Certificate:
    """What ``certify`` found: the stages run, the settings reached and whether they meet the target."""

    target: float
    max_cost: int | None  # the budget in gradient evaluations, or None
    points: int
    stages: tuple[Stage, ...]
    reached: bool
    max_seconds: float | None = None  # the budget in seconds, or None

    @property
    def final(self) -> Stage:
        """The strongest settings tried (the last stage)."""
        return self.stages[-1]

    @property
    def cost(self) -> int:
        return sum(stage.cost for stage in self.stages)

    def to_record(self) -> dict[str, object]:
        """The certificate as JSON: the target, the settings reached, their gap, and every stage with its cost."""
        final = self.final
        return {
            "target_gap": self.target,
            "reached": self.reached,
            "steps": final.steps,
            "leapfrog": final.leapfrog,
            "gap": {"mean": final.gap, "stderr": final.stderr},
            "upper": final.upper,
            "simulated_points": self.points,
            "max_cost": self.max_cost,
            "max_seconds": self.max_seconds,
            "seconds": sum(stage.seconds for stage in self.stages),
            "cost": self.cost,
            "stages": [
                {"steps": s.steps, "leapfrog": s.leapfrog, "gap": {"mean": s.gap, "stderr": s.stderr}, "upper": s.upper,
                 "cost": s.cost, "seconds": s.seconds}
                for s in self.stages
            ],
        }

    def failure(self) -> str:
        """The one line saying the target was not reached: the gap reached, its settings and the budget."""
        final = self.final
        return (f"target gap {self.target:g} not reached: BDMC gap {final.gap:.4f} ± {final.stderr:.4f} "
                f"(upper {final.upper:.4f}) at --steps {final.steps} --leapfrog {final.leapfrog}, "
                f"the strongest settings within --max-cost {self.budget}")

    @property
    def budget(self) -> str:
        """The budget, as the command line gave it."""
        if self.max_seconds is not None:
            return f"{self.max_seconds:g}s"
        return f"{self.max_cost:,} gradient evaluations"

    def settings(self, annealing: AISOptions) -> AISOptions:
        """``annealing`` at the settings the certificate reached."""
        return replace(annealing, steps=self.final.steps, leapfrog=self.final.leapfrog)


def stage_cost(annealing: AISOptions, points: int) -> int:
    """Gradient evaluations of one BDMC run on ``points`` points: forward and reverse runs, and the pilot."""
    per_chain = 1 + max(annealing.steps - 1, 0) * annealing.leapfrog
    pilot = annealing.pilots * annealing.pilot_chains * per_chain
    return points * (pilot + 2 * annealing.chains * per_chain)


def check_target(target_gap: float, max_cost: int | None, annealing: AISOptions, points: int,
                 max_seconds: float | None = None) -> None:
    """Raise ``VaeevalError`` for a target that is not a positive number, or a budget below one stage."""
    if isinstance(target_gap, bool) or not isinstance(target_gap, (int, float)) or not math.isfinite(target_gap) \
            or target_gap <= 0:
        raise VaeevalError(f"{option('target_gap')} must be a positive number of nats, found {target_gap!r}")
    if isinstance(points, bool) or not isinstance(points, int) or not 2 <= points <= MAX_SIMULATED:
        raise VaeevalError(f"{option('n')} must be from 2 to {MAX_SIMULATED:,} for a standard error, found {points!r}")
    if max_seconds is not None:  # a stage's time is known only once one has run: the first always runs
        if isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float)) or not math.isfinite(max_seconds) \
                or max_seconds <= 0 or max_cost is not None:
            raise VaeevalError(f"{option('max_cost')} in seconds must be one positive number of seconds, "
                               f"found {max_seconds!r}")
        return
    first = stage_cost(annealing, points)
    if isinstance(max_cost, bool) or not isinstance(max_cost, int) or max_cost < first:
        raise VaeevalError(
            f"{option('max_cost')} {max_cost!r} is below one BDMC stage at --steps {annealing.steps} --leapfrog "
            f"{annealing.leapfrog} on {points} simulated points ({first:,} gradient evaluations)"
        )


def _next(annealing: AISOptions, stages: list[Stage]) -> AISOptions | None:
    """The settings after ``stages``: T doubled, or L doubled when the last doubling of T gained little."""
    slow = len(stages) >= 2 and stages[-1].leapfrog == stages[-2].leapfrog and stages[-1].gap > SLOW_GAIN * stages[-2].gap
    if (slow or annealing.steps * 2 > MAX_STEPS) and annealing.leapfrog * 2 <= MAX_LEAPFROG:
        return replace(annealing, leapfrog=annealing.leapfrog * 2)
    if annealing.steps * 2 <= MAX_STEPS:
        return replace(annealing, steps=annealing.steps * 2)
    return None


def certify(
    model: Model,
    annealing: AISOptions,
    options: EvaluationOptions,
    target_gap: float,
    max_cost: int | None,
    *,
    max_seconds: float | None = None,
    points: int = DEFAULT_CERTIFY_POINTS,
    progress: Callable[[Stage], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Certificate:
    """Run BDMC at growing settings until its gap's upper confidence bound is below ``target_gap``.

    Args:
        model: the model (one BDMC can simulate from).
        annealing: the settings of the first stage (T, L, chains, step size ...).
        options: the seed (of the simulation too) and the rest, as for ``run_bdmc``.
        target_gap: G, nats per point.
        max_cost: the budget, in gradient evaluations over all stages (None with ``max_seconds``).
        max_seconds: instead, a budget in seconds: the first stage always runs, and a later one
            only when its time, predicted from the seconds per gradient evaluation so far, fits.
        points: how many points to simulate (the same points at every stage).
        progress: called with each stage as it finishes.

    Raises:
        VaeevalError: a bad target or budget, or a model BDMC cannot simulate from.
    """
    annealing.check()
    check_target(target_gap, max_cost, annealing, points, max_seconds)
    simulated = simulate(model, points, seed=options.seed,
                         bins=simulation_grid(model, options.discretize, options.density, options.grid_range))
    stages: list[Stage] = []
    spent, elapsed = 0, 0.0

    def affordable(cost: int) -> bool:
        if max_seconds is not None:
            return not stages or elapsed + elapsed / spent * cost <= max_seconds
        return spent + cost <= max_cost

    current: AISOptions | None = annealing
    while current is not None and affordable(stage_cost(current, points)):
        started = clock()
        summary = BDMCEvaluator(model, simulated, current, options).evaluate().summary
        seconds = clock() - started
        stderr = float(summary.gap.stderr)
        stage = Stage(current.steps, current.leapfrog, float(summary.gap.mean), stderr,
                      float(summary.gap.mean) + Z_UPPER * stderr, stage_cost(current, points), seconds)
        stages.append(stage)
        spent, elapsed = spent + stage.cost, elapsed + seconds
        if progress is not None:
            progress(stage)
        if stage.upper < target_gap:
            return Certificate(target_gap, max_cost, points, tuple(stages), True, max_seconds)
        current = _next(current, stages)
    return Certificate(target_gap, max_cost, points, tuple(stages), False, max_seconds)


def elbo_note(evaluation: Evaluation, model: dict, data: dict, *, convergence: bool = False) -> str | None:
    """``ais_next_step`` from an elbo document's model and data records, the same whether the run was made in one
    process or merged from results files: the IWAE-versus-K check counts only where ``convergence`` was asked
    (a results file holds no convergence)."""
    return ais_next_step(evaluation if convergence else dataclasses.replace(evaluation, convergence=None),
                         str(model.get("path")), str(data.get("path")), arch=model.get("arch") is not None)


def ais_next_step(evaluation: Evaluation, model: str, data: str, *, arch: bool = False) -> str | None:
    """``elbo``'s note when its IWAE may be low: the ``ais --target-gap`` command to run, and its estimated cost.

    It is written when k-hat flags points unreliable, or when the IWAE still rose by more than
    ``STILL_RISING`` nats per point over the last tenfold of K (the nested-subset convergence
    check); otherwise None. ``arch``: the model was read through ``--arch``, whose options the
    command needs again.
    """
    reasons = []
    flagged = len(evaluation.summary.diagnostics.unreliable)
    if flagged:
        reasons.append(f"k-hat flags {flagged} of {evaluation.summary.n} points unreliable")
    convergence = evaluation.convergence
    if convergence is not None and len(convergence.samples) >= 2:
        gain = float(np.mean(convergence.iwae[:, -1] - convergence.iwae[:, -2]))
        if gain > STILL_RISING:
            reasons.append(f"IWAE still rose by {gain:.3f} nats per point from K = {convergence.samples[-2]} "
                           f"to {convergence.samples[-1]}")
    if not reasons:
        return None
    defaults = AISOptions()
    stage = stage_cost(defaults, DEFAULT_CERTIFY_POINTS)
    per_point = (defaults.pilots * defaults.pilot_chains + defaults.chains) * (1 + (defaults.steps - 1) * defaults.leapfrog)
    command = f"vaeeval ais {shlex.quote(model)} {shlex.quote(data)} --target-gap {SUGGESTED_GAP:g}"
    command += " (with this run's --arch options)" if arch else ""
    return (
        f"{'; '.join(reasons)}, so the IWAE may be low: the next step is {command}. Estimated cost (an estimate: "
        f"how many certification stages a model needs is not known in advance): {stage:,} gradient evaluations "
        f"for the first BDMC stage at the default settings on {DEFAULT_CERTIFY_POINTS} simulated points, each "
        f"further stage about double the one before, then {per_point * evaluation.summary.n:,} for AIS on these "
        f"{evaluation.summary.n} points ({per_point:,} per point at the default settings; more if the "
        "certificate needs more steps)."
    )
