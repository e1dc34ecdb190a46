"""A bin's probability under any continuous distribution with a ``cdf``, right in both tails.

``cdf(hi) - cdf(lo)`` is exact where the bin holds a fair share of the mass, but a cdf is
computed to a few units of its dtype's precision *of one*: in an upper tail (F near 1)
the difference cancels, and many cdfs (``0.5 (1 + erf(t / √2))``, say) cancel in the lower
tail as well. So a bin whose difference falls below ``resolution`` (2^26 units of the cdf's
dtype, 1.5e-8 for float64: a relative error of about 1e-7 at most where the difference is
kept; a float32 cdf keeps only bins of half the mass or more) is integrated from the density
instead, which is as precise far out in a tail as anywhere:

* a closed bin over which log p is nearly straight (it bends from its chord by less than one
  and falls by at most ``CHORD_FALL`` e-folds): Gauss-Legendre on v = (1 - e^(-r u)) / r,
  x = a ± u, anchored at the bin's end of higher density ``a``, r the chord's slope; the
  substitution takes the exponential fall out, so what the nodes integrate is nearly flat;
* any other bin: the difference of the two tails beyond its ends, and an open (outermost)
  bin: its one tail, each ∫_a^∞ p = (1/r) Σ_j w_j p(a ± y_j / r) e^(y_j), Gauss-Laguerre with
  r log p's rate of decay at ``a`` (central differences): a fall that steepens like a
  normal's, or a Gumbel's, is what the e^(-y) weight fits.

The sums run in log space (``numerics.logsumexp``), so no mass underflows: a bin 40 standard
deviations out gets its log-probability, not a floor (tests/test_quadrature.py: every bin of
the 8-bit grid equals mpmath to 1e-9 relative, for six families and a float32 cdf). A bin
that needs the integral but cannot have it (its log p raises, or does not fall into an open
tail) is refused, never floored. Such bins cost about 54 evaluations of ``log_prob`` for the
batch that holds them; a batch without them costs the two cdf calls.

torch validates a transformed distribution's values against its base's support, and an edge
far in a tail, mapped into the base, can round past it (Gumbel's Uniform): the cdf is called
with the distribution's (and its bases') ``_validate_args`` off, restored after the call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.distributions import Distribution

from vaeeval.core import numerics
from vaeeval.errors import VaeevalError

NODES = 16
_POINTS, _WEIGHTS = np.polynomial.legendre.leggauss(NODES)  # on [-1, 1]
_LAGUERRE_POINTS, _LAGUERRE_WEIGHTS = np.polynomial.laguerre.laggauss(NODES)  # on [0, inf) against e^(-y)
_LAGUERRE_LOG_WEIGHTS = np.log(_LAGUERRE_WEIGHTS)
RESOLUTION = 2.0**26  # in units of the cdf's dtype eps: 1.5e-8 for float64
CHORD_FALL = 2.0  # e-folds of density across a bin that Gauss-Legendre on the tilted variable still takes
DENSE = 0.5  # a float32 cdf (eps 1.2e-7) keeps only bins of at least this mass


@contextmanager
def _unvalidated(distribution: Distribution) -> Iterator[None]:
    """Its cdf at any edge: torch checks a transformed distribution's values against its base's support
    (Gumbel's Uniform), and an edge far in a tail, mapped into the base, rounds past it."""
    touched = []
    part = distribution
    while isinstance(part, Distribution):
        if getattr(part, "_validate_args", False):
            touched.append(part)
            part._validate_args = False
        part = getattr(part, "base_dist", None)
    try:
        yield
    finally:
        for part in touched:
            part._validate_args = True


def resolution(dtype: torch.dtype) -> float:
    """The smallest cdf difference kept as it is, for a cdf computed in ``dtype``."""
    return min(RESOLUTION * torch.finfo(dtype).eps, DENSE)


def log_bin_from_cdf(
    distribution: Distribution,
    x: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    step: float,
) -> torch.Tensor:
    """log P(lower < X <= upper) per element in float64, from the cdf where it resolves the bin, else from the density.

    Args:
        distribution: over tensors of ``x``'s shape (its ``cdf``, ``log_prob`` and ``support``).
        x: the values, float64, in its support.
        lower, upper: each value's bin, float64, infinite for the open outermost bins.
        step: the grid's spacing (the neighbouring bin's width, for an open bin's rate of decay).
    """
    cdf = distribution.cdf
    log_prob = _log_density(distribution, x)
    open_low, open_high = torch.isinf(lower), torch.isinf(upper)
    try:
        with _unvalidated(distribution):
            low = torch.where(open_low, 0.0, cdf(torch.where(open_low, x, lower)))
            high = torch.where(open_high, 1.0, cdf(torch.where(open_high, x, upper)))
    except Exception:  # its cdf refuses some edge (torch validates a transform's value far in a tail): integrate every bin
        low, high = torch.zeros_like(x), torch.full_like(x, math.nan)
    dtype = torch.promote_types(low.dtype, high.dtype)
    mass = high.double() - low.double()
    need = ~(mass >= resolution(dtype))  # NaN too
    if not bool(need.any()):
        return torch.log(mass)
    integral = _log_integral(log_prob, lower, upper, open_low, open_high, step)
    failed = need & ~(integral < math.inf)  # NaN, or +inf: no integral
    if bool(failed.any()):
        where = int(torch.nonzero(failed.reshape(-1))[0])
        raise VaeevalError(
            f"has a bin [{lower.reshape(-1)[where].item():.6g}, {upper.reshape(-1)[where].item():.6g}] (value "
            f"{x.reshape(-1)[where].item():.6g}) whose probability is below its cdf's resolution ({mass.reshape(-1)[where].item():.3g}) "
            "and whose density cannot be integrated over it (its log_prob fails there, or does not fall into the open tail)"
        )
    return torch.where(need, integral, torch.log(mass.clamp(min=0.0)))


def _log_integral(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    lower: torch.Tensor,
    upper: torch.Tensor,
    open_low: torch.Tensor,
    open_high: torch.Tensor,
    step: float,
) -> torch.Tensor:
    """log ∫ p over each bin; NaN where it cannot be had.

    A closed bin over which log p is nearly straight (it bends from its chord by less than
    one) is Gauss-Legendre on v = (1 - e^(-r u)) / r, r the chord's slope, anchored at its
    end of higher density (``_log_chord``); a bin much wider than the density's scale, and
    an open one, is a difference of tails, each Gauss-Laguerre (``_log_tail``): a fall
    that steepens like a normal's is what Laguerre's e^(-y) weight fits.
    """
    opened = open_low | open_high
    width = upper - lower  # inf for an open bin
    h = step * 2.0**-10  # slopes by central differences: a relative error of about 1e-7, and only r's
    ends = torch.where(open_low, upper, lower), torch.where(open_high, lower, upper)
    try:
        (f_low, slope_low), (f_high, slope_high) = (_value_and_slope(log_prob, end, h) for end in ends)
        falls = f_low >= f_high  # the density falls across the bin, from lower to upper
        falls = torch.where(open_high, True, torch.where(open_low, False, falls))
        # the tail beyond the bin's near end, in the direction the density falls, and beyond its far end
        near, far = torch.where(falls, ends[0], ends[1]), torch.where(falls, ends[1], ends[0])
        direction = torch.where(falls, 1.0, -1.0)
        near_slope = torch.where(falls, -slope_low, slope_high)  # rates of decay in that direction
        far_slope = torch.where(falls, -slope_high, slope_low)
        tail_near = _log_tail(log_prob, near, direction, near_slope)
        tail_far = torch.where(opened, -math.inf, _log_tail(log_prob, far, direction, far_slope))
        by_tails = tail_near + log1mexp_safe(tail_near - tail_far)
        chord = torch.where(opened, 0.0, (f_low - f_high).abs() / torch.where(opened, 1.0, width))
        by_chord = _log_chord(log_prob, near, direction, chord, torch.where(opened, 0.0, width))
    except Exception:  # the user's log_prob refuses these points: no integral
        return torch.full_like(lower, math.nan)
    # the chord takes out log p's fall across the bin; what is left bulges by about |f''| width^2 / 8
    # (and a fall across it of at most CHORD_FALL, past which v's map from u nears its singularity at 1 / r)
    bulge = (far_slope - near_slope).abs() * width / 8
    return torch.where(opened | (bulge > 1) | (chord * width > CHORD_FALL), by_tails, by_chord)


def log1mexp_safe(d: torch.Tensor) -> torch.Tensor:
    """log(1 - e^(-d)) for d >= 0 (0 at d = inf), NaN for d < 0 (the far tail larger than the near one)."""
    return torch.where(d > 0, torch.log(-numerics.expm1(-d.clamp(min=1e-300))), math.nan)


def _value_and_slope(log_prob: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p at the points and its slope there (central differences)."""
    return log_prob(at), (log_prob(at + h) - log_prob(at - h)) / (2 * h)


def _log_tail(
    log_prob: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor, direction: torch.Tensor, rate: torch.Tensor
) -> torch.Tensor:
    """log ∫ p from ``at`` to infinity in ``direction`` (±1): (1/r) Σ w_j p(at ± y_j / r) e^(y_j), Gauss-Laguerre,
    with r log p's rate of decay at ``at``; NaN where it does not decay there."""
    usable = rate > 0
    safe = torch.where(usable, rate, 1.0)
    terms = [
        weight + log_prob(at + direction * (node / safe)) + node
        for node, weight in zip(_LAGUERRE_POINTS, _LAGUERRE_LOG_WEIGHTS, strict=True)
    ]
    return torch.where(usable, numerics.logsumexp(torch.stack(terms, dim=-1)) - torch.log(safe), math.nan)


def _log_chord(
    log_prob: Callable[[torch.Tensor], torch.Tensor], at: torch.Tensor, direction: torch.Tensor, rate: torch.Tensor, width: torch.Tensor
) -> torch.Tensor:
    """log ∫ p over [at, at ± width]: Gauss-Legendre on v = (1 - e^(-r u)) / r, which takes the fall at rate r out."""
    flat = rate == 0
    safe = torch.where(flat, 1.0, rate)
    span = torch.where(flat, width, -numerics.expm1(-safe * width) / safe)
    terms = []
    for point, weight in zip(_POINTS, _WEIGHTS, strict=True):
        v = span * (0.5 * (point + 1))
        u = torch.where(flat, v, -numerics.log1p(-safe * v) / safe)
        terms.append(math.log(weight) + log_prob(at + direction * u) + rate * u)
    return numerics.logsumexp(torch.stack(terms, dim=-1)) + torch.log(0.5 * span)


def _log_density(distribution: Distribution, inside: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """log p at any points in float64: -inf outside its support (where its ``log_prob`` is not asked, since torch
    refuses such values); ``inside``, points of the support, stand in for them."""

    def log_density(points: torch.Tensor) -> torch.Tensor:
        try:
            within = distribution.support.check(points)
        except (NotImplementedError, RuntimeError, TypeError):
            within = torch.ones_like(points, dtype=torch.bool)
        value = distribution.log_prob(torch.where(within, points, inside)).double()
        return torch.where(within, value, -math.inf)

    return log_density
