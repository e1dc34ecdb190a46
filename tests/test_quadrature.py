"""Bins of any continuous ``decode()`` distribution with a cdf, exact in both tails (vaeeval/user/quadrature.py).

Every one of the 256 bins of the 8-bit grid, for distributions outside vaeeval's table of
exact families (a Normal of the user's own class, the same with a float32 cdf, Gumbel,
Cauchy, LogNormal) and scales from 1e-4 to 1, against mpmath at 60 digits: a cdf difference
where it resolves the bin, the density integrated over it where the bin is far in a tail.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from torch.distributions import Cauchy, Gumbel, Independent, LogNormal, Normal

from vaeeval.errors import VaeevalError
from vaeeval.format.domains import Grid
from vaeeval.user.distributions import log_prob_of
from vaeeval.user.quadrature import log_bin_from_cdf

mpmath.mp.dps = 60
LEVELS = 256
VALUES = np.arange(LEVELS) / (LEVELS - 1)


class OwnNormal(Normal):
    """Not in vaeeval's table: binned through its own cdf and density."""


class Float32Cdf(Normal):
    """A cdf that can only give float32 (the user's own, say)."""

    def cdf(self, value):
        return super().cdf(value).float()


class NoCdf(OwnNormal):
    """A cdf that fails on every call: every bin comes from the density alone."""

    def cdf(self, value):
        raise ValueError("no cdf here")


class GumbelNoCdf(Gumbel):
    def cdf(self, value):
        raise ValueError("no cdf here")


def _normal(m, s):
    root2 = mpmath.sqrt(2)
    return (lambda t: mpmath.erfc(-(t - m) / s / root2) / 2), (lambda t: mpmath.erfc((t - m) / s / root2) / 2)


def _gumbel(m, b):
    return (lambda t: mpmath.exp(-mpmath.exp(-(t - m) / b))), (lambda t: -mpmath.expm1(-mpmath.exp(-(t - m) / b)))


def _cauchy(m, s):
    # both tails without cancellation: F(t) = atan2(1, -(t - m)/s) / pi, 1 - F(t) = atan2(1, (t - m)/s) / pi
    return (lambda t: mpmath.atan2(1, -(t - m) / s) / mpmath.pi), (lambda t: mpmath.atan2(1, (t - m) / s) / mpmath.pi)


def _lognormal(m, s):
    root2 = mpmath.sqrt(2)
    cdf = lambda t: mpmath.mpf(0) if t <= 0 else mpmath.erfc(-(mpmath.log(t) - m) / s / root2) / 2
    survival = lambda t: mpmath.mpf(1) if t <= 0 else mpmath.erfc((mpmath.log(t) - m) / s / root2) / 2
    return cdf, survival


def _reference(x: float, cdf, survival) -> float:
    """log P(bin of x) at 60 digits: from the cdf below the median, from the survival function above it."""
    k = round(x * (LEVELS - 1))
    half = mpmath.mpf(0.5) / (LEVELS - 1)
    lo = None if k <= 0 else mpmath.mpf(x) - half
    hi = None if k >= LEVELS - 1 else mpmath.mpf(x) + half
    below = (mpmath.mpf(0) if lo is None else cdf(lo), mpmath.mpf(1) if hi is None else cdf(hi))
    if below[0] < 0.5:
        return float(mpmath.log(below[1] - below[0]))
    return float(mpmath.log((mpmath.mpf(1) if lo is None else survival(lo)) - (mpmath.mpf(0) if hi is None else survival(hi))))


def f32(value: float) -> float:
    return float(np.float32(value))


CASES = {
    # name: (distribution from float64 parameters [1, 256], mpmath cdf and survival)
    **{
        f"own normal, scale {s:g}, mean {m:g}": (lambda m=m, s=s: OwnNormal(_row(m), f32(s)), _normal(f32(m), f32(s)))
        for m, s in ((0.45, 1e-4), (0.45, 0.02), (0.45, 1.0), (1.7, 0.05))
    },
    "density alone, normal": (lambda: NoCdf(_row(0.45), f32(0.02)), _normal(f32(0.45), f32(0.02))),
    "density alone, gumbel": (lambda: GumbelNoCdf(_row(0.3), f32(0.01)), _gumbel(f32(0.3), f32(0.01))),
    "float32 cdf, scale 0.02": (lambda: Float32Cdf(_row(0.45), f32(0.02)), _normal(f32(0.45), f32(0.02))),
    "gumbel, scale 0.01": (lambda: Gumbel(_row(0.3), f32(0.01)), _gumbel(f32(0.3), f32(0.01))),
    "gumbel, scale 0.2": (lambda: Gumbel(_row(0.3), f32(0.2)), _gumbel(f32(0.3), f32(0.2))),
    "cauchy, scale 1e-6": (lambda: Cauchy(_row(0.6), f32(1e-6)), _cauchy(f32(0.6), f32(1e-6))),
    "lognormal": (lambda: LogNormal(_row(math.log(0.3)), f32(0.1)), _lognormal(f32(math.log(0.3)), f32(0.1))),
}


def _row(value: float) -> torch.Tensor:
    return torch.full((1, LEVELS), f32(value), dtype=torch.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_every_bin_of_the_8_bit_grid_equals_mpmath_in_both_tails(name):
    make, (cdf, survival) = CASES[name]
    x = torch.as_tensor(VALUES, dtype=torch.float32)[None]
    found = log_prob_of(Independent(make(), 1), x, Grid(LEVELS))  # the sum over the 256 bins
    each = _per_bin(make, x)
    expected = np.array([_reference(float(np.float32(v)), cdf, survival) for v in VALUES])
    assert np.all(np.isfinite(each))
    np.testing.assert_allclose(each, expected, rtol=1e-9, atol=1e-15)  # atol: bins holding all but 1e-23 of the mass
    np.testing.assert_allclose(found.item(), math.fsum(expected), rtol=1e-9)


def _per_bin(make, x: torch.Tensor) -> np.ndarray:
    """Each bin's log-probability, through the same entry as ``log_prob_of`` without the sum."""
    from vaeeval.user.distributions import _log_bin

    return _log_bin(make(), x.reshape(1, LEVELS), Grid(LEVELS)).reshape(-1).numpy()


def test_a_bin_its_cdf_cannot_resolve_and_its_density_cannot_reach_is_refused_not_floored():
    class NoDensity(OwnNormal):
        def log_prob(self, value):
            raise NotImplementedError

    distribution = NoDensity(torch.zeros(1, 2, dtype=torch.float64), 0.01)
    x = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    grid = Grid(LEVELS)
    lower = torch.tensor([[-math.inf, 1 - 0.5 / 255]], dtype=torch.float64)
    upper = torch.tensor([[0.5 / 255, math.inf]], dtype=torch.float64)
    with pytest.raises(VaeevalError, match=r"has a bin \[0.998039, inf\] \(value 1\) whose probability is below its cdf's"):
        log_bin_from_cdf(distribution, x, lower, upper, grid.step)
