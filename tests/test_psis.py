"""vaeeval.results.psis: the Pareto tail shape k-hat of importance weights, against arviz, and its threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import arviz_khat

from vaeeval.results.psis import pareto_khat, reliability_threshold, top_size


def _top(log_w: np.ndarray) -> np.ndarray:
    return np.sort(log_w, axis=1)[:, -top_size(log_w.shape[1]):]


@pytest.mark.parametrize("samples", [100, 1000, 4000])
def test_khat_agrees_with_arviz(samples):
    rng = np.random.default_rng(samples)
    cases = {
        "lognormal": rng.normal(0, 1.5, (40, samples)),
        "pareto tail": np.log(rng.pareto(1.2, (40, samples)) + 1),
        "near-degenerate": rng.normal(0, 1e-6, (40, samples)),
        "spread beyond float range": rng.normal(0, 400, (40, samples)),
    }
    for name, log_w in cases.items():
        expected = arviz_khat(log_w)
        found = pareto_khat(_top(log_w), samples)
        finite = np.isfinite(expected)
        np.testing.assert_allclose(found[finite], expected[finite], atol=1e-4, rtol=0, err_msg=name)
        assert np.array_equal(np.isinf(found), ~finite), name


def test_equal_weights_have_no_tail_and_need_no_division():
    with np.errstate(all="raise"):
        khat = pareto_khat(np.zeros((3, top_size(1000))), 1000)
    assert np.all(khat == -np.inf)  # arviz says inf: "cannot fit"; here there is nothing to fit
    assert not np.any(khat > reliability_threshold(1000))


def test_reliability_threshold():
    assert reliability_threshold(10_000) == 0.7
    assert reliability_threshold(100) == pytest.approx(0.5)
    assert reliability_threshold(1) == -math.inf
