"""BDMC (Grosse, Ghahramani & Adams 2015; Wu et al. 2017): certify AIS on points simulated from the model.

A point x drawn with its latent z from p(z) p(x|z) is annealed forward from the
initial distribution (a stochastic lower bound on log p(x)) and in reverse from
its exact posterior draw z (a stochastic upper bound): the gap between the two
bounds how far AIS at these settings can be from log p(x).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributions import Distribution

from vaeeval.core import rng
from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.annealing.ais import MAX_SIMULATED, AISOptions, _Annealer, refuse_discrete
from vaeeval.estimators.annealing.kernel import REVERSE, SIMULATE, SIMULATE_X, decodable, log_mean_exp, prior_draws
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.format.data import Dataset
from vaeeval.format.domains import Grid, detect_domain
from vaeeval.format.model import Model
from vaeeval.io.files import atomic_write, writing
from vaeeval.results.numbers import BDMCEvaluation, BDMCPointResults, summarize_bdmc


@dataclass(frozen=True)
class Simulated:
    """Points drawn from the model: ``z ~ p(z)`` ``[n, L]`` and ``x ~ p(x|z)`` ``[n, *input_shape]``."""

    x: np.ndarray
    z: np.ndarray
    bins: Grid | None  # the grid the values were binned to, if any


def simulation_grid(
    model: Model, discretize: int | None, density: bool, grid_range: tuple[float, float] | None = None
) -> Grid | None:
    """The grid simulated points lie on: ``discretize`` (on ``grid_range``, else the model's declared range),
    the model's declared grid, or the family's own levels."""
    if model.likelihood.levels is not None:
        return Grid(model.likelihood.levels)
    if density:
        return None
    declared = model.domain.grid if model.domain is not None else None
    if discretize is not None:
        return Grid(discretize, *(grid_range or ((declared.low, declared.high) if declared else (0.0, 1.0))))
    return declared


def simulate(model: Model, n: int, *, seed: int = 0, bins: Grid | None = None) -> Simulated:
    """Draw ``n`` points from the model: z ~ p(z), then x ~ p(x|z), keyed by (seed, point index).

    Args:
        model: the model.
        n: how many points.
        seed: the noise seed.
        bins: bin a continuous family's draws to this grid (the model's data domain): a
            binned draw is exactly a draw of the bin-probability model.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SIMULATED:
        raise VaeevalError(f"{option('n')} must be from 1 to {MAX_SIMULATED:,}, found {n!r}")
    refuse_discrete(model)
    if model.covariates:
        raise VaeevalError(
            f"bdmc simulates points from p(z) p(x|z), and this model is conditioned on {', '.join(model.covariates)}, "
            "which it cannot simulate; run vaeeval ais on data instead"
        )
    if getattr(model, "teacher_forced", False):
        raise VaeevalError(
            f"bdmc simulates points from p(z) p(x|z), and {model.decoder.method}(z, x) is teacher-forced: a draw of x "
            "from it is ancestral, one position at a time, which vaeeval does not do; run vaeeval ais on data instead"
        )
    indices = np.arange(n)
    dims = model.data_dims
    xs, zs = [], []
    with torch.no_grad():
        for start in range(0, n, 256):
            rows = indices[start : start + 256]
            z = prior_draws(model.prior, seed, rows, 1, SIMULATE, torch.device("cpu"))[:, 0]
            decoded = model.decode_any(z.float()) if model.general else model.decode(z.float())
            if isinstance(decoded, Distribution):  # the model's own sampler, seeded by the batch's first point
                x = _sampled(decoded, seed, int(rows[0])).reshape(rows.size, *model.input_shape)
            else:
                uniform = torch.from_numpy(rng.uniform(seed, rows, np.arange(dims, dtype=np.uint64), SIMULATE_X))
                x = model.likelihood.sample(decoded.double(), uniform.reshape(rows.size, *model.input_shape))
            if bins is not None and model.likelihood.levels is None:
                x = bins.values(bins.nearest(x.clamp(bins.low, bins.high)))
            xs.append(x.to(torch.float32).numpy())
            zs.append(z.numpy())
    return Simulated(np.concatenate(xs), np.concatenate(zs), bins)


def _sampled(distribution: Distribution, seed: int, first: int) -> torch.Tensor:
    """One draw of ``distribution`` by its own ``sample``, under a generator keyed by (seed, first point)."""
    key = int(rng.point_keys(seed, np.asarray([first]), SIMULATE_X)[0]) & (2**63 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        return distribution.sample()


@dataclass(frozen=True)
class BDMCPart:
    """The BDMC results for some of the simulated points."""

    points: BDMCPointResults


class BDMCEvaluator(_Annealer):
    """BDMC on simulated points: forward AIS from q0, reverse AIS from the true z, IWAE beside.

    Args:
        model: a loaded model.
        simulated: points drawn from the model (``simulate``).
        ais, options: as for ``AISEvaluator``.
    """

    _runs_per_point = 2

    def __init__(self, model: Model, simulated: Simulated, ais: AISOptions, options: EvaluationOptions) -> None:
        dataset = Dataset(simulated.x, total=len(simulated.x), domain=detect_domain(simulated.x))
        super().__init__(model, dataset, ais, options)
        self.simulated = simulated

    def parts(self, indices: np.ndarray | None = None, progress: Callable[[int], None] | None = None) -> Iterator[BDMCPart]:
        for rows, x, target, tuning, forward, tick in self._annealed(indices, progress):
            with torch.no_grad():
                truth = torch.from_numpy(self.simulated.z[rows]).to(x.device).double()
                start = decodable(truth[:, None].expand(-1, self.ais.chains, -1).contiguous())
                reverse = tuning.anneal(target, start, seed=self.settings.seed, indices=rows, streams=REVERSE,
                                        leapfrog=self.ais.leapfrog, reverse=True, tick=tick)
            lower = log_mean_exp(forward.log_weight).cpu().numpy()
            upper = (-log_mean_exp(-reverse.log_weight)).cpu().numpy()
            beside = self._beside(rows)
            yield BDMCPart(BDMCPointResults(
                index=rows.copy(),
                lower=lower,
                upper=upper,
                gap=upper - lower,
                iwae=beside.iwae,
                acceptance=self._acceptance(forward, reverse),
                from_prior=self._from_prior(target, rows.size),
            ))

    def finish(self, parts: Sequence[BDMCPart]) -> BDMCEvaluation:
        points = BDMCPointResults.concatenate([p.points for p in parts]).in_index_order()
        return BDMCEvaluation(
            points=points,
            summary=summarize_bdmc(points),
            settings=self.settings,
            scoring=self.scoring,
            domain=self.importance.domain,
            cost=self.cost,
        )

    def evaluate(self, progress: Callable[[int], None] | None = None) -> BDMCEvaluation:
        return self.finish(list(self.parts(progress=progress)))


def save_simulated(path: str | Path, simulated: Simulated) -> None:
    """Write simulated points as an ``.npz`` holding ``x`` ``[n, *input_shape]`` and ``z`` ``[n, L]``."""
    with writing(Path(path), "simulated data"), atomic_write(path, "wb") as handle:
        np.savez(handle, x=simulated.x, z=simulated.z)


def run_bdmc(
    model: Model,
    n: int,
    annealing: AISOptions | None = None,
    options: EvaluationOptions | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[BDMCEvaluation, Simulated]:
    """Simulate ``n`` points from the model and bracket their log p(x) by forward and reverse AIS.

    Args:
        model: the model.
        n: points to simulate.
        annealing: how to anneal (default ``AISOptions()``).
        options: the seed (of the simulation too), the IWAE beside it, the device and the
            scoring; ``discretize`` or the model's declared grid bins the simulated values.

    Returns:
        The evaluation and the simulated points.
    """
    options = options or EvaluationOptions()
    simulated = simulate(model, n, seed=options.seed, bins=simulation_grid(model, options.discretize, options.density, options.grid_range))
    evaluator = BDMCEvaluator(model, simulated, annealing or AISOptions(), options)
    return evaluator.evaluate(progress), simulated
