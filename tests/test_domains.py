"""vaeeval.format.domains: what values data may take, format 1's data block, and the smallest domain holding some values."""

from __future__ import annotations

import numpy as np
import pytest

from vaeeval.errors import SpecError
from vaeeval.format.domains import DOMAINS, Domain, detect_domain, domain_from_spec, grid_levels

pytestmark = pytest.mark.filterwarnings("error")  # checking values must not warn: in the CLI a warning is a line on stderr

# ----------------------------------------------------------------- membership


def test_binary_domain():
    x = np.array([0, 1, 0.5, -1, 2, 1e-7, 1 - 1e-7], dtype=np.float64)
    np.testing.assert_array_equal(Domain("binary").outside(x), [False, False, True, True, True, True, True])
    assert not Domain("binary").outside(np.array([[True, False]])).any()
    assert not Domain("binary").outside(np.array([0, 1], dtype=np.uint8)).any()


def test_real_domain():
    x = np.array([[-1e30, 0.0, 3.5], [1e30, -0.0, 1.0]], dtype=np.float32)
    mask = Domain("real").outside(x)
    assert mask.shape == x.shape and mask.dtype == bool and not mask.any()


def test_unit_interval_domain():
    x = np.array([0.0, 1.0, 0.5, 0.3, 1e-30, -1e-7, 1 + 1e-6, 2.0, -3.0], dtype=np.float32)
    np.testing.assert_array_equal(
        Domain("unit_interval").outside(x), [False] * 5 + [True] * 4
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [2, 5, 17, 256])
def test_discrete_domain_accepts_its_grid(levels, dtype):
    grid = (np.arange(levels) / (levels - 1)).astype(dtype)
    mask = Domain("discrete", levels).outside(grid.reshape(1, -1))
    assert mask.shape == (1, levels)
    assert not mask.any()


def test_discrete_domain_grid_tolerance():
    domain = Domain("discrete", 17)
    on_grid = (np.arange(17, dtype=np.float32) / np.float32(16)).astype(np.float32)
    assert not domain.outside(on_grid).any()
    # k/16 computed in float32 another way (and via float16) is still on the grid.
    assert not domain.outside(np.float32(np.arange(17)) * np.float32(0.0625)).any()
    assert not domain.outside(on_grid.astype(np.float16)).any()
    off_grid = np.array([0.03, 1 / 32, 0.5 + 0.01, 0.999, -1 / 16, 1 + 1 / 16], dtype=np.float32)
    np.testing.assert_array_equal(domain.outside(off_grid), [True] * 6)


def test_discrete_domain_is_not_binary_only():
    x = np.array([0.0, 0.25, 0.5, 0.75, 1.0, 0.3, 0.2], dtype=np.float32)
    np.testing.assert_array_equal(Domain("discrete", 5).outside(x), [False] * 5 + [True] * 2)
    np.testing.assert_array_equal(Domain("discrete", 2).outside(x), [False, True, True, True, False, True, True])


def test_outside_keeps_the_shape():
    x = np.full((3, 1, 2, 3), 0.5, dtype=np.float32)
    for domain in (Domain("binary"), Domain("real"), Domain("unit_interval"), Domain("discrete", 3)):
        mask = domain.outside(x)
        assert mask.shape == x.shape and mask.dtype == bool


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, None),
        ({"domain": "binary"}, Domain("binary")),
        ({"domain": "real"}, Domain("real")),
        ({"domain": "unit_interval"}, Domain("unit_interval")),
        ({"domain": "discrete", "levels": 256}, Domain("discrete", 256)),
        ({"domain": "discrete", "levels": 2}, Domain("discrete", 2)),
    ],
)
def test_domain_from_spec(spec, expected):
    domain = domain_from_spec(spec)
    assert domain == expected
    if domain is not None:
        assert domain_from_spec(domain.to_spec()) == domain
        assert domain.to_spec() == spec
        assert domain.describe()


@pytest.mark.parametrize(
    ("spec", "phrase"),
    [
        ("binary", 'must be an object with a "domain"'),
        ({}, 'must be an object with a "domain"'),
        ({"domain": "pixels"}, "'pixels' is not one of binary, discrete, unit_interval, real"),
        ({"domain": "discrete"}, 'needs "levels", an integer from 2 to 65536, found None'),
        ({"domain": "discrete", "levels": 1}, "found 1"),
        ({"domain": "discrete", "levels": True}, "found True"),
        ({"domain": "discrete", "levels": 4.0}, "found 4.0"),
        ({"domain": "discrete", "levels": "5"}, "found '5'"),
    ],
    ids=["string", "empty", "unknown", "no-levels", "levels-1", "levels-bool", "levels-float", "levels-str"],
)
def test_domain_from_spec_errors(spec, phrase):
    with pytest.raises(SpecError) as caught:
        domain_from_spec(spec)
    assert phrase in str(caught.value)


def test_domain_describe():
    assert Domain("binary").describe() == "binary data (0 or 1)"
    assert Domain("discrete", 5).describe() == "discrete data on 5 levels k/4"
    assert Domain("unit_interval").describe() == "data in [0, 1]"
    assert Domain("real").describe() == "real-valued data"
    assert Domain("counts").describe() == "count data (non-negative integers)"


# ----------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("values", "domain"),
    [
        ([0, 1, 1, 0], Domain("binary")),
        ([0, 0, 0], Domain("binary")),
        (np.arange(17) / 16, Domain("discrete", 17)),
        (np.array([0, 4, 16]) / 16, Domain("discrete", 5)),  # the smallest grid that holds them
        ((np.arange(256) / 255).astype(np.float32), Domain("discrete", 256)),
        (np.random.default_rng(0).random(500), Domain("unit_interval")),
        ([-0.5, 0.25], Domain("discrete", 9, -1.0, 1.0)),  # on [-1, 1]'s grid of step 1/4
        (2 * np.arange(256) / 255 - 1, Domain("discrete", 256, -1.0, 1.0)),  # 8-bit images as diffusers holds them
        (np.random.default_rng(0).uniform(-1, 1, 500), Domain("real")),
        ([0.0, 2.0], Domain("counts", high=2.0)),  # non-negative integers beyond 1, the largest kept
        ([0.0, 2.0, 1e6], Domain("counts", high=1e6)),
        ([0.0, 2.5], Domain("real")),
        ([-1.0, 2.0], Domain("real")),
    ],
)
def test_domain_detection(values, domain):
    assert detect_domain(np.asarray(values, dtype=np.float64).reshape(-1, 1)) == domain


def test_detection_reads_every_block(monkeypatch):
    """Binary in the first blocks, then one 0.5 or one 2 in the last: the whole array decides."""
    monkeypatch.setattr("vaeeval.format.domains._SCAN_ELEMENTS", 3)  # three one-value points per block
    binary = [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert detect_domain(np.array([*binary, 0.5]).reshape(-1, 1)) == Domain("discrete", 3)
    assert detect_domain(np.array([*binary, 2.5]).reshape(-1, 1)) == Domain("real")
    assert detect_domain(np.array([*binary, 2.0]).reshape(-1, 1)) == Domain("counts", high=2.0)
    assert detect_domain(np.array([2.0, 3.0, 4.0, 0.5]).reshape(-1, 1)) == Domain("real")
    assert detect_domain(np.array(binary).reshape(-1, 1)) == Domain("binary")


def test_more_levels_than_a_grid_is_looked_for_in_read_as_the_unit_interval():
    levels = 5000
    assert detect_domain((np.arange(levels) / (levels - 1)).reshape(-1, 1)) == Domain("unit_interval")
    assert grid_levels(np.array([0.0, 1 / 3, 1.0]), 4097) == 4
    assert grid_levels(np.array([0.0, 1 / 5000]), 4097) is None


def test_every_domain_has_words_and_a_spec():
    for kind in DOMAINS:
        domain = Domain(kind, 3 if kind == "discrete" else None)
        assert domain_from_spec(domain.to_spec()) == domain and domain.describe()
