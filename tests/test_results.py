"""Results: plain NumPy data, summarized once; the leaf modules import nothing heavy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vaeeval.results.numbers import AISPointResults, PointResults, mean_and_stderr, summarize, summarize_ais

PACKAGE = Path(__file__).resolve().parents[1] / "vaeeval"


def _points(n: int, seed: int = 0) -> PointResults:
    rng = np.random.default_rng(seed)
    values = {name: rng.normal(size=n) for name in ("elbo", "recon", "kl", "iwae", "kl_stderr", "elbo_stderr", "iwae_stderr")}
    return PointResults(index=np.arange(n), ess=rng.uniform(1, 10, n), khat=rng.uniform(0, 1, n),
                        unreliable=rng.uniform(size=n) > 0.5, **values)


def test_summary_is_mean_and_standard_error_of_the_points():
    points = _points(40)
    summary = summarize(points, dims=8, samples=10)
    assert summary.iwae.mean == pytest.approx(points.iwae.mean())
    assert summary.iwae.stderr == pytest.approx(points.iwae.std(ddof=1) / np.sqrt(40))
    assert summary.bits_per_dim.mean == pytest.approx(-points.iwae.mean() / (8 * np.log(2)))
    assert summary.diagnostics.share == pytest.approx(points.unreliable.mean())
    assert mean_and_stderr(np.array([3.0])).stderr is None


def test_columns_concatenate_take_and_sort_by_index():
    points = _points(6)
    shuffled = points.take(np.array([5, 1, 3, 0, 4, 2]))
    assert np.array_equal(shuffled.in_index_order().iwae, points.iwae)
    halves = PointResults.concatenate([points.take(np.arange(3)), points.take(np.arange(3, 6))])
    assert np.array_equal(halves.elbo, points.elbo)


def test_ais_summary_gap_is_paired_per_point():
    rng = np.random.default_rng(1)
    n = 30
    iwae = rng.normal(-100, 5, n)
    ais = iwae + rng.uniform(0, 2, n)
    points = AISPointResults(index=np.arange(n), ais=ais, ais_stderr=np.full(n, 0.1), ess=np.full(n, 4.0),
                             acceptance=np.full(n, 0.6), step_size=np.full(n, 0.1), elbo=iwae - 3, iwae=iwae)
    summary = summarize_ais(points, dims=10)
    assert summary.gap.mean == pytest.approx((ais - iwae).mean())
    assert summary.gap.stderr == pytest.approx((ais - iwae).std(ddof=1) / np.sqrt(n))
    assert summary.gap.stderr < np.hypot(summary.ais.stderr, summary.iwae.stderr)
