"""What an evaluation found, as plain numbers: per-point arrays, their summary and diagnostics.

NumPy only. The estimators fill these; ``output`` turns them into tables and
JSON; results files are read back into them. Means, standard errors and
bits per dimension are computed once, by ``summarize``, from per-point arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from vaeeval.format.domains import Domain, Grid, describe_range
from vaeeval.format.terms import DENSITY, MONTE_CARLO
from vaeeval.results.psis import reliability_threshold

if TYPE_CHECKING:
    from vaeeval.results.sequences import SequenceSummary

METRICS = ("elbo", "recon", "kl", "iwae")


@dataclass(frozen=True)
class Settings:
    """How an evaluation was run."""

    samples: int
    seed: int
    batch_size: int
    chunk_size: int
    device: str


@dataclass(frozen=True)
class Scoring:
    """How a model is scored on some data.

    Attributes:
        measure: ``"density"`` or ``"probability"``: what kind of number recon and iwae are.
        levels: the bins a continuous family is scored on (``None``: its density,
            or a discrete family, whose own levels are the event).
        data_levels: the levels of the data's grid, when it is discrete.
        note: one sentence saying what the numbers are, for the output.
        range: the values [low, high] both grids span ([0, 1] unless the data or the model says another).
    """

    measure: str
    levels: int | None
    data_levels: int | None
    note: str
    range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "range", (float(self.range[0]), float(self.range[1])))  # a JSON list read back

    @property
    def bins(self) -> Grid | None:
        """The grid a continuous family is scored on (``None``: a density, or a discrete family's own event)."""
        return None if self.levels is None else Grid(self.levels, *self.range)

    @property
    def data_grid(self) -> Grid | None:
        return None if self.data_levels is None else Grid(self.data_levels, *self.range)

    @property
    def label(self) -> str:
        """``density``, ``probability``, ``probability (17 bins)`` or ``probability (256 bins on [-1, 1])``."""
        if not self.levels:
            return self.measure
        where = "" if self.range == (0.0, 1.0) else f" on {describe_range(*self.range)}"
        return f"{self.measure} ({self.levels} bins{where})"

    def dequantization_offset(self, dims: int) -> float | None:
        """D log(bin width) for a density on discrete data (the uniform-dequantization correction)."""
        grid = self.data_grid
        if self.measure != DENSITY or grid is None:
            return None
        return dims * math.log(grid.step)


class Columns:
    """Per-point arrays of equal length, one field each (the first is ``index``)."""

    index: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[Columns]) -> Columns:
        """The points of several parts, in the order given (a column some part lacks, None, is None)."""
        found = {f.name: [getattr(p, f.name) for p in parts] for f in fields(cls)}
        return cls(**{name: None if any(v is None for v in values) else np.concatenate(values) for name, values in found.items()})

    def take(self, rows: np.ndarray) -> Columns:
        """These rows, in this order."""
        return type(self)(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in fields(self)})

    def in_index_order(self) -> Columns:
        """The points sorted by index."""
        return self.take(np.argsort(self.index, kind="stable"))


@dataclass(frozen=True)
class PointResults(Columns):
    """Per-point estimates in nats, ``[N]`` float64 each, higher is better (but ``kl``).

    Diagnostics per point: ``elbo_stderr`` and ``kl_stderr`` are Monte Carlo standard
    errors over the K samples (``kl_stderr`` 0 when the KL is analytic); ``iwae_stderr``
    the delta-method standard error sqrt(1/ESS - 1/K); ``ess`` the effective sample
    size of the importance weights; ``khat`` their Pareto tail shape (``psis``), with
    ``unreliable`` where it exceeds ``psis.reliability_threshold(K)``. ``tokens``: the
    positions that count of each padded sequence (``--lengths``), else None.
    """

    index: np.ndarray
    elbo: np.ndarray
    recon: np.ndarray
    kl: np.ndarray
    iwae: np.ndarray
    kl_stderr: np.ndarray
    elbo_stderr: np.ndarray
    iwae_stderr: np.ndarray
    ess: np.ndarray
    khat: np.ndarray
    unreliable: np.ndarray
    tokens: np.ndarray | None = None


@dataclass(frozen=True)
class Part:
    """The results for some of the points: a batch, a shard, or what a stopped run had done."""

    points: PointResults
    convergence: np.ndarray  # [n, len(checkpoints)]
    latent_means: np.ndarray  # [n, latent_dim]
    latent_vars: np.ndarray


@dataclass(frozen=True)
class Stat:
    """Mean over points and its standard error (``None`` for a single point)."""

    mean: float
    stderr: float | None


@dataclass(frozen=True)
class Diagnostics:
    """How far to trust the numbers, over the data set.

    ``gap`` is iwae - elbo, a lower bound on the inference gap E_q[log q(z|x) / p(z|x)];
    ``unreliable`` lists the flagged points, worst (largest k-hat) first.
    """

    threshold: float
    unreliable: tuple[int, ...]
    share: float
    gap: Stat
    ess: Stat
    ess_fraction: Stat
    khat: Stat
    elbo_stderr: Stat
    iwae_stderr: Stat


@dataclass(frozen=True)
class Summary:
    """Means and standard errors over points.

    ``bits_per_dim`` is -iwae / (D ln 2). For a density on discrete data,
    ``dequantized_bits_per_dim`` is the same for iwae + D log(bin width), the
    figure usually reported for densities on dequantized data.
    """

    n: int
    elbo: Stat
    recon: Stat
    kl: Stat
    iwae: Stat
    bits_per_dim: Stat
    diagnostics: Diagnostics
    dequantized_bits_per_dim: Stat | None = None
    sequences: SequenceSummary | None = None  # per token, where the points are padded sequences (``--lengths``)


@dataclass(frozen=True)
class Convergence:
    """IWAE from nested subsets of each point's samples: the first k of them, for k in ``samples``."""

    samples: tuple[int, ...]
    iwae: np.ndarray  # [N, len(samples)]

    def summary(self) -> list[tuple[int, Stat]]:
        """Mean and standard error over points of the IWAE at each k."""
        return [(k, mean_and_stderr(self.iwae[:, j])) for j, k in enumerate(self.samples)]


@dataclass(frozen=True)
class Evaluation:
    """Everything one evaluation found."""

    points: PointResults
    summary: Summary
    settings: Settings
    scoring: Scoring  # what kind of number recon and iwae are, and how it was made
    kl_kind: str  # ANALYTIC or MONTE_CARLO
    domain: Domain  # the data's values, as detected
    convergence: Convergence | None = None  # None when read back from per-point records
    latent_means: np.ndarray | None = None  # [N, latent_dim], the encoder's q(z|x) means
    latent_vars: np.ndarray | None = None  # [N, latent_dim], and variances

    @property
    def measure(self) -> str:
        """``"density"`` or ``"probability"``."""
        return self.scoring.measure

    @property
    def monte_carlo_kl(self) -> bool:
        """The KL was estimated from the samples (and has a standard error per point)."""
        return self.kl_kind == MONTE_CARLO


def exact_sum(values: np.ndarray) -> float:
    """The correctly rounded sum (``math.fsum``): the same bits in any order or grouping of the values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(values).all():  # inf or NaN: exact anyway, and fsum refuses inf - inf
        return float(values.sum())
    return math.fsum(values.tolist())


def exact_mean(values: np.ndarray) -> float:
    """``exact_sum`` over n."""
    values = np.asarray(values, dtype=np.float64).ravel()
    return exact_sum(values) / values.size


def mean_and_stderr(values: np.ndarray) -> Stat:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(n)).

    Both sums are exactly rounded (``exact_sum``), so the numbers do not depend on how the
    points were split into batches, shards or processes, nor on NumPy's vector code.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        return Stat(exact_mean(values), None)
    return Stat(exact_mean(values), math.sqrt(exact_variance(values)) / math.sqrt(values.size))


def exact_variance(values: np.ndarray) -> float:
    """The unbiased sample variance from exactly rounded sums (0 for fewer than two values)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        return 0.0
    deviations = values - exact_mean(values)
    return exact_sum(deviations * deviations) / (values.size - 1)


def convergence_checkpoints(samples: int) -> tuple[int, ...]:
    """1, 10, 100, ... below K, and K."""
    return tuple(10**j for j in range(int(math.log10(samples)) + 1) if 10**j < samples) + (samples,)


def diagnose(points: PointResults, samples: int) -> Diagnostics:
    """The data set's diagnostics from the per-point ones."""
    flagged = np.flatnonzero(points.unreliable)
    worst_first = flagged[np.argsort(-points.khat[flagged], kind="stable")]
    finite_khat = points.khat[np.isfinite(points.khat)]
    return Diagnostics(
        threshold=reliability_threshold(samples),
        unreliable=tuple(int(points.index[i]) for i in worst_first),
        share=float(flagged.size / max(points.index.size, 1)),
        gap=mean_and_stderr(points.iwae - points.elbo),
        ess=mean_and_stderr(points.ess),
        ess_fraction=mean_and_stderr(points.ess / samples),
        khat=mean_and_stderr(finite_khat) if finite_khat.size else Stat(math.nan, None),
        elbo_stderr=mean_and_stderr(points.elbo_stderr) if samples > 1 else Stat(math.nan, None),
        iwae_stderr=mean_and_stderr(points.iwae_stderr),
    )


def summarize(
    points: PointResults, dims: int, samples: int, dequantization_offset: float | None = None
) -> Summary:
    """Means and standard errors over points, bits per dimension of -iwae, and diagnostics.

    Args:
        points: the per-point estimates.
        dims: D, dimensions per point.
        samples: K, samples per point.
        dequantization_offset: D log(bin width), for a density on discrete data.
    """
    from vaeeval.results.sequences import sequence_summary  # it builds on this module's means

    per_dim = dims * math.log(2)
    return Summary(
        n=int(points.index.size),
        elbo=mean_and_stderr(points.elbo),
        recon=mean_and_stderr(points.recon),
        kl=mean_and_stderr(points.kl),
        iwae=mean_and_stderr(points.iwae),
        bits_per_dim=mean_and_stderr(-points.iwae / per_dim),
        diagnostics=diagnose(points, samples),
        dequantized_bits_per_dim=(
            None
            if dequantization_offset is None
            else mean_and_stderr(-(points.iwae + dequantization_offset) / per_dim)
        ),
        sequences=None if points.tokens is None else sequence_summary(points.iwae, points.elbo, points.tokens),
    )


def evaluation_of(
    points: PointResults, *, settings: Settings, scoring: Scoring, kl_kind: str, domain: Domain, dims: int,
    convergence: Convergence | None = None, latent_means: np.ndarray | None = None,
    latent_vars: np.ndarray | None = None,
) -> Evaluation:
    """The evaluation of these points (in index order): summarized and diagnosed."""
    return Evaluation(
        points=points,
        summary=summarize(points, dims, settings.samples, scoring.dequantization_offset(dims)),
        settings=settings,
        scoring=scoring,
        kl_kind=kl_kind,
        domain=domain,
        convergence=convergence,
        latent_means=latent_means,
        latent_vars=latent_vars,
    )


# ---------------------------------------------------------------- annealed importance sampling


@dataclass(frozen=True)
class AISSettings:
    """How an AIS run was made (``samples`` and ``seed`` also drove the ELBO and IWAE beside it).

    ``step_size`` is the fixed ε, or None when a pilot of ``pilot_chains`` chains tuned ε per
    point and step; ``batch_size`` counts points per annealing batch.
    """

    steps: int
    leapfrog: int
    chains: int
    init: str
    schedule: str
    step_size: float | None
    pilot_chains: int
    seed: int
    samples: int
    batch_size: int
    device: str
    mass: str = "identity"


@dataclass(frozen=True)
class AISPointResults(Columns):
    """Per-point AIS results, ``[N]`` each.

    ``ais`` is log (1/C) Σ_c w_c over the chains' weights, ``ais_stderr`` its delta-method
    standard error (NaN for one chain), ``ess`` the chains' effective sample size,
    ``acceptance`` the share of accepted HMC proposals, ``step_size`` the mean ε over the
    transitions; ``elbo`` and ``iwae`` come from the ordinary importance-sampling run of the
    same point.
    """

    index: np.ndarray
    ais: np.ndarray
    ais_stderr: np.ndarray
    ess: np.ndarray
    acceptance: np.ndarray
    step_size: np.ndarray
    elbo: np.ndarray
    iwae: np.ndarray
    tokens: np.ndarray | None = None  # padded sequences (--lengths): the positions that count
    from_prior: np.ndarray | None = None  # where the chains started from p(z), not q(z|x)


@dataclass(frozen=True)
class AISCost:
    """Decoder gradient evaluations (forward and backward passes) per point, by the pilot and the run."""

    pilot: int
    run: int

    @property
    def pilot_share(self) -> float:
        """The pilot's share of all gradient evaluations."""
        return self.pilot / max(self.pilot + self.run, 1)


@dataclass(frozen=True)
class AISSummary:
    """Means over points and their standard errors; ``gap`` is ais - iwae, point by point."""

    n: int
    ais: Stat
    elbo: Stat
    iwae: Stat
    gap: Stat
    ais_stderr: Stat
    acceptance: Stat
    bits_per_dim: Stat
    sequences: SequenceSummary | None = None  # per token, from ais (--lengths)


@dataclass(frozen=True)
class AISEvaluation:
    """Everything one AIS run found."""

    points: AISPointResults
    summary: AISSummary
    settings: AISSettings
    scoring: Scoring
    domain: Domain
    cost: AISCost

    @property
    def measure(self) -> str:
        return self.scoring.measure


def summarize_ais(points: AISPointResults, dims: int) -> AISSummary:
    """Means and standard errors over points, and bits per dimension of -ais (per token, with tokens)."""
    from vaeeval.results.sequences import sequence_summary

    return AISSummary(
        n=int(points.index.size),
        ais=mean_and_stderr(points.ais),
        elbo=mean_and_stderr(points.elbo),
        iwae=mean_and_stderr(points.iwae),
        gap=mean_and_stderr(points.ais - points.iwae),
        ais_stderr=mean_and_stderr(points.ais_stderr),
        acceptance=mean_and_stderr(points.acceptance),
        bits_per_dim=mean_and_stderr(-points.ais / (dims * math.log(2))),
        sequences=None if points.tokens is None else sequence_summary(points.ais, points.elbo, points.tokens, "ais"),
    )


@dataclass(frozen=True)
class BDMCPointResults(Columns):
    """Per simulated point: forward AIS (``lower``), reverse AIS from the true z (``upper``), their gap, and IWAE."""

    index: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gap: np.ndarray
    iwae: np.ndarray
    acceptance: np.ndarray
    from_prior: np.ndarray | None = None  # where the forward chains started from p(z), not q(z|x)


@dataclass(frozen=True)
class BDMCSummary:
    """Means over the simulated points and their standard errors."""

    n: int
    lower: Stat
    upper: Stat
    gap: Stat
    iwae: Stat
    acceptance: Stat


@dataclass(frozen=True)
class BDMCEvaluation:
    """Everything one BDMC run found; ``weak`` when the mean gap exceeds ``GAP_LIMIT`` nats per point."""

    points: BDMCPointResults
    summary: BDMCSummary
    settings: AISSettings
    scoring: Scoring
    domain: Domain
    cost: AISCost

    @property
    def measure(self) -> str:
        return self.scoring.measure

    @property
    def weak(self) -> bool:
        return self.summary.gap.mean > GAP_LIMIT


GAP_LIMIT = 1.0  # nats per point: a larger BDMC gap says the AIS settings are too weak for the model


def summarize_bdmc(points: BDMCPointResults) -> BDMCSummary:
    return BDMCSummary(
        n=int(points.index.size),
        lower=mean_and_stderr(points.lower),
        upper=mean_and_stderr(points.upper),
        gap=mean_and_stderr(points.gap),
        iwae=mean_and_stderr(points.iwae),
        acceptance=mean_and_stderr(points.acceptance),
    )
