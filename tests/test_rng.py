"""Counter-based normal draws: correct distribution, keyed only by (seed, point, sample)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from vaeeval.core.rng import standard_normal


def test_draws_are_standard_normal():
    draws = standard_normal(0, np.arange(50), 0, 400, 5).numpy().ravel()
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert abs(draws.mean()) < 4 / np.sqrt(draws.size)
    assert abs(draws.var() - 1) < 4 * np.sqrt(2 / draws.size)


def test_draws_depend_only_on_seed_point_and_sample():
    whole = standard_normal(7, np.arange(10), 0, 300, 3)
    part = standard_normal(7, np.array([4, 5]), 128, 300, 3)
    assert torch.equal(part, whole[4:6, 128:300])
    assert not torch.equal(standard_normal(8, np.arange(10), 0, 300, 3), whole)


def test_points_and_dimensions_are_uncorrelated():
    draws = standard_normal(3, np.arange(200), 0, 64, 4).numpy()
    flat = draws.transpose(0, 2, 1).reshape(800, 64)  # (point, dim) streams
    correlation = np.corrcoef(flat)[np.triu_indices(800, 1)]
    # independent streams: correlations ~ N(0, 1/64)
    assert np.abs(correlation).max() < 6 / np.sqrt(64)
    assert abs(correlation.mean()) < 4 / np.sqrt(64 * correlation.size)
