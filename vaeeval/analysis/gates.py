"""Gates for CI: fail a build when a model got worse, and only when it really did.

``--fail-under iwae=-85`` compares a run's mean with a fixed threshold.
``vaeeval check NEW --baseline OLD`` compares two runs on the same points: the
per-point paired difference has a much smaller standard error than the two
means apart, so it fails only when the drop exceeds the tolerance with the
given confidence (one-sided), never on Monte Carlo noise alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vaeeval.core.numerics import ndtri
from vaeeval.errors import VaeevalError, option
from vaeeval.results.numbers import AISSummary, Stat, Summary, exact_mean, mean_and_stderr
from vaeeval.runs.formats import StoredRun

GATED = ("elbo", "recon", "iwae")  # higher is better
AIS_GATED = ("ais", "elbo", "iwae")  # the means an AIS run reports, higher is better
CHECKED = (*GATED, "ais")  # what check compares, when both runs have it


class GateFailed(Exception):
    """The run worked, but a requested check failed (exit code 1); ``str`` is the one-line reason."""


@dataclass(frozen=True)
class Threshold:
    """``metric`` must have a mean of at least ``value``."""

    metric: str
    value: float

    @classmethod
    def parse(cls, text: str, metrics: tuple[str, ...] = GATED) -> Threshold:
        """``iwae=-85.0`` -> the threshold, on one of ``metrics``."""
        metric, _, value = text.partition("=")
        metric = metric.strip()
        if metric not in metrics:
            raise VaeevalError(
                f"{option('fail_under')} {text!r}: gate one of {', '.join(metrics)} (higher is better), as METRIC=VALUE"
            )
        try:
            number = float(value)
        except ValueError:
            raise VaeevalError(f"{option('fail_under')} {text!r}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise VaeevalError(f"{option('fail_under')} {text!r}: the threshold must be finite")
        return cls(metric, number)


def check_thresholds(summary: Summary | AISSummary, thresholds: list[Threshold]) -> None:
    """Raise ``GateFailed`` naming every threshold the summary's means fall below."""
    failures = [
        f"{t.metric} mean {getattr(summary, t.metric).mean:.4f} < {t.value:g}"
        for t in thresholds
        if getattr(summary, t.metric).mean < t.value
    ]
    if failures:
        raise GateFailed("; ".join(failures))


@dataclass(frozen=True)
class BaselineCheck:
    """The outcome of ``vaeeval check``."""

    metric: str
    new: float
    baseline: float
    difference: Stat  # new - baseline, paired per point
    points: int
    tolerance: float
    confidence: float
    passed: bool

    @property
    def reason(self) -> str:
        """One line saying what was compared and why it passed or failed."""
        se = self.difference.stderr or 0.0
        head = (
            f"{self.metric}: {self.new:.4f} vs baseline {self.baseline:.4f}, change {self.difference.mean:+.4f} "
            f"± {se:.4f} (paired over {self.points} points)"
        )
        if self.passed:
            return f"{head}; not worse by more than {self.tolerance:g} at {self.confidence:.0%} confidence"
        bound = self.difference.mean + _quantile(self.confidence) * se
        return f"{head}; worse by more than {self.tolerance:g} at {self.confidence:.0%} confidence (upper bound {bound:+.4f})"


def check_baseline(
    new: StoredRun, baseline: StoredRun, *, metric: str = "iwae", tolerance: float = 0.0, confidence: float = 0.95
) -> BaselineCheck:
    """Is ``new`` worse than ``baseline`` in ``metric`` by more than ``tolerance``, beyond noise?

    Fails when the one-sided upper confidence bound of the mean paired difference
    (new - baseline) lies below -tolerance.

    Raises:
        VaeevalError: different data or points, unknown metric, or a file without per-point results.
    """
    if metric not in CHECKED:
        raise VaeevalError(f"{option('metric')} {metric!r}: check one of {', '.join(CHECKED)}")
    if not 0.5 <= confidence < 1:
        raise VaeevalError(f"{option('confidence')} {confidence}: choose a level in [0.5, 1)")
    if tolerance < 0:
        raise VaeevalError(f"{option('tolerance')} {tolerance}: must be >= 0")
    digests = new.header["data"].get("digest"), baseline.header["data"].get("digest")
    if digests[0] != digests[1]:
        raise VaeevalError(
            f"{new.path} and {baseline.path} cover different data ({digests[0]} vs {digests[1]}); "
            "a baseline check pairs the same points"
        )
    for run in (new, baseline):
        if run.points and metric not in run.points[0]:
            raise VaeevalError(f"{run.path}: its points have no {metric!r} (choose another {option('metric')})")
    new_points = {r["index"]: r[metric] for r in new.points}
    old_points = {r["index"]: r[metric] for r in baseline.points}
    if not new_points or set(new_points) != set(old_points):
        raise VaeevalError(
            f"{new.path} and {baseline.path} cover different points ({len(new_points)} vs {len(old_points)}); "
            "a baseline check pairs the same points"
        )
    order = sorted(new_points)
    a = np.array([new_points[i] for i in order], dtype=np.float64)
    b = np.array([old_points[i] for i in order], dtype=np.float64)
    difference = mean_and_stderr(a - b)
    bound = difference.mean + _quantile(confidence) * (difference.stderr or 0.0)
    return BaselineCheck(
        metric=metric,
        new=exact_mean(a),
        baseline=exact_mean(b),
        difference=difference,
        points=len(order),
        tolerance=tolerance,
        confidence=confidence,
        passed=bound >= -tolerance,
    )


def _quantile(confidence: float) -> float:
    """The standard normal quantile (``numerics.ndtri``: the same bits on every machine)."""
    return float(ndtri(np.array([confidence]))[0])

