"""Elementary functions and reductions whose every bit is fixed by their inputs.

vaeeval promises that no number depends on the batch, the thread count or the CPU's
vector instructions. torch's and NumPy's CPU kernels keep that promise only for some
operations (measured with ``ATEN_CPU_CAPABILITY`` default / avx2 / avx512 and
``NPY_DISABLE_CPU_FEATURES``; ``tests/test_numerics.py`` checks them on the machine at hand):

* ``+ - * /``, ``sqrt``, ``abs``, ``maximum``, ``where``, ``round`` and bit operations are
  exactly rounded (IEEE 754): every element's result is the same in any kernel;
* torch's ``exp``, ``log``, ``tanh`` and ``erf`` (MKL's vector math on x86) gave the same
  bits at every position and for every ``ATEN_CPU_CAPABILITY``;
* torch's ``log1p``, ``expm1``, ``softplus``, ``logsigmoid``, ``sigmoid``, ``logaddexp``,
  ``lgamma``, ``log_softmax``, ``addcmul`` and ``special.ndtri`` are ATen's own code: their
  last bit changes with the ISA, and some with the element's position in the tensor;
* NumPy's ``exp``, ``log`` and ``log1p`` change their last bit between AVX-512 and AVX2;
* reductions (``sum``, ``logsumexp``, ``mean``) add in an order the library chooses.

Two tiers follow. The per-element passes of likelihoods and activations (one value per
data dimension and sample) use torch's ``exp`` and ``log`` inside the stable forms
``log1p``, ``expm1``, ``softplus`` and ``log_softmax`` below. Everything per sample, per point
and per data set (importance weights, their log-sum-exp, ESS, k-hat, AIS weights, the
normal draws themselves) uses ``exp``, ``log`` and ``ndtri`` written here with exactly
rounded operations only (polynomials after an exact range reduction, as in fdlibm and Tang
1989; Wichura's AS 241), sums over a fixed pairwise tree (``tree_sum``), and
``logsumexp`` / ``logaddexp`` from those: a few elementwise passes over small tensors.
Means over points use ``math.fsum`` (``results.exact_sum``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**11 (fdlibm)
_LN2_LO = 1.90821492927058770002e-10
# fdlibm's e_exp.c P1..P5 (Remez, |r| <= ln2/2): exp(r) to within 2**-59 through its rational form.
_EXP_P = (4.13813679705723846039e-08, -1.65339022054652515390e-06, 6.61375632143793436117e-05,
          -2.77777777770155933842e-03, 1.66666666666666019037e-01)
_ATANH_TERMS = tuple(1 / (2 * k + 1) for k in range(12))  # atanh(s)/s in s^2, |s| <= 0.1716: error < 2**-60
_SQRT_HALF = math.sqrt(0.5)
_MANTISSA = (1 << 52) - 1
_EXPONENT_ONE = 1023 << 52


Array = TypeVar("Array", torch.Tensor, np.ndarray)


def _horner(coefficients: tuple[float, ...], r: Array) -> Array:
    """The polynomial with these coefficients (highest power first) at ``r``, in place on a new array."""
    result = r * coefficients[0] + coefficients[1]
    for coefficient in coefficients[2:]:
        result *= r
        result += coefficient
    return result


def _float64(x: Array) -> Array:
    return x.astype(np.float64, copy=False) if isinstance(x, np.ndarray) else x.double()


def _view(x: Array, integer: bool) -> Array:
    """The same 64 bits read as int64 or float64."""
    if isinstance(x, np.ndarray):
        return x.view(np.int64 if integer else np.float64)
    return x.view(torch.int64 if integer else torch.float64)


def _where(condition: Array, a, b) -> Array:
    return np.where(condition, a, b) if isinstance(condition, np.ndarray) else torch.where(condition, a, b)


def _any(mask: Array) -> bool:
    return bool(mask.any())


def exp(x: Array) -> Array:
    """e**x in float64 for a tensor or a NumPy array (no gradient: it reads bits), within 1 ulp,
    the same bits on any CPU and at any position.

    x = n ln2 + r with |r| <= ln2/2 (n ln2 subtracted in two exact parts, as fdlibm's
    ``__ieee754_exp``), exp(r) = 1 - ((r c)/(c - 2) - r) with c = r - r² P(r²), P fdlibm's
    degree-4 minimax polynomial, then scaled by 2**n in two exact steps (so that subnormal
    results are right too). Overflow gives inf, underflow 0, NaN stays NaN.
    """
    x = _float64(x)
    x = np.clip(x, -746.0, 710.0) if isinstance(x, np.ndarray) else x.clamp(-746.0, 710.0)
    n = x / _LN2_HI
    n = np.rint(n) if isinstance(n, np.ndarray) else torch.round(n)  # both round half to even
    r = (x - n * _LN2_HI) - n * _LN2_LO
    t = r * r
    c = _horner(_EXP_P, t)
    c *= t
    c = r - c
    result = r * c
    result /= c - 2.0
    result -= r
    result = 1.0 - result
    if _any(n != n):
        n = _where(n == n, n, 0.0)  # NaN -> 0 (the result is NaN already)
    whole = n.astype(np.int64) if isinstance(n, np.ndarray) else n.to(torch.int64)
    half = whole >> 1
    result *= _view((half + 1023) << 52, integer=False)  # 2**half and 2**(n - half), each in [-1022, 1023]
    result *= _view((whole - half + 1023) << 52, integer=False)
    return result


def log(x: Array) -> Array:
    """The natural log in float64 for a tensor or a NumPy array (no gradient), within 3 ulp,
    the same bits on any CPU and at any position.

    x = m 2**e with m in [sqrt(1/2), sqrt(2)) read from the bits; log m = 2 atanh(s) with
    s = (m - 1)/(m + 1), |s| < 0.172, from its odd series; e ln2 added in two parts.
    log 0 = -inf, log of a negative number or NaN is NaN, log inf = inf.
    """
    x = _float64(x)
    subnormal = x < 2.2250738585072014e-308  # also 0, negatives and -inf: fixed below
    scaled = _where(subnormal, x * 2.0**54, x) if _any(subnormal) else x
    bits = _view(scaled, integer=True)
    e = ((bits >> 52) & 0x7FF) - 1023
    m = _view((bits & _MANTISSA) | _EXPONENT_ONE, integer=False)
    high = m > 2 * _SQRT_HALF
    m = _where(high, m * 0.5, m)
    e = _float64(e + _where(high, 1, 0))
    if _any(subnormal):
        e = e - _where(subnormal, 54.0, 0.0)
    s = (m - 1) / (m + 1)
    series = _horner(_ATANH_TERMS[::-1], s * s)
    series *= 2 * s
    result = e * _LN2_HI + (e * _LN2_LO + series)
    special = ~(x > 0) | (x == math.inf)
    if _any(special):
        result = _where(x == 0, -math.inf, result)
        result = _where(x == math.inf, math.inf, result)
        result = _where((x < 0) | (x != x), math.nan, result)
    return result


def log1p(x: Array, logarithm: Callable[[Array], Array] = torch.log) -> Array:
    """log(1 + x) for x >= -1, accurate near 0 (Goldberg 1991), through ``logarithm``
    (torch's for the per-element passes; ``numerics.log`` for statistics and NumPy arrays).

    u = 1 + x is rounded; log(u) x / (u - 1) corrects for that rounding. Where u is 1 the
    result is x, and no branch sends a NaN gradient through the other.
    """
    u = 1 + x
    ordinary = (u != 1) & (np.isfinite(u) if isinstance(u, np.ndarray) else u.isfinite())
    ratio = x / _where(ordinary, u - 1, 1.0)
    return _where(ordinary, logarithm(_where(ordinary, u, 2.0)) * ratio, _where(u == 1, x, logarithm(u)))


def expm1(x: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1, accurate near 0 (Kahan: (u - 1) x / log u for u = exp(x) rounded).

    Where u rounds to 1 the result is x; where u - 1 rounds to -1 (or u underflows), -1.
    No branch sends a NaN gradient through the other.
    """
    u = torch.exp(x)
    ordinary = (u != 1) & (u - 1 != -1) & u.isfinite()
    safe = torch.where(ordinary, u, 0.5)
    ratio = (safe - 1) * (x / torch.log(safe))
    return torch.where(ordinary, ratio, torch.where(u == 1, x, torch.where(u < 0.5, -1.0, u)))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e**x) = max(x, 0) + log1p(e**-|x|), for any x without overflow.

    -|x| is taken as where(x > 0, -x, x), so that the gradient is e^x / (1 + e^x) to full
    relative precision for x < 0, and 1/2 at 0.
    """
    positive = x > 0
    return torch.where(positive, x, 0.0) + log1p(torch.exp(torch.where(positive, -x, x)))


def fold_(values: torch.Tensor, combine: Callable[..., torch.Tensor], *, narrowest: int = 64, most: int | None = None) -> torch.Tensor:
    """Combine the last axis of ``values`` pairwise, in place, until at most ``narrowest`` columns are left.

    Column j takes column j + w/2 at each halving (an odd last column goes into column
    0 first), so each result column is a balanced tree of the inputs. The tree depends
    only on the width, and ``combine`` (``torch.add``, ``torch.mul``) is exactly rounded
    elementwise, so a row's result never depends on the other rows or on vectorization.

    Args:
        values: ``[..., D]`` float tensor, overwritten.
        combine: a binary elementwise torch function taking ``out=``.
        narrowest: stop at this many columns or fewer.
        most: stop before any column would combine more than this many inputs.

    Returns:
        ``[..., w]``, a view of ``values``' first ``w`` columns: ``w <= narrowest`` unless ``most`` stopped the folding first.
    """
    width, terms = values.shape[-1], 1
    while width > narrowest:
        grown = terms * (3 if width % 2 else 2)
        if most is not None and grown > most:
            break
        if width % 2:
            combine(values[..., :1], values[..., width - 1 : width], out=values[..., :1])
            width -= 1
        half = width // 2
        combine(values[..., :half], values[..., half:width], out=values[..., :half])
        width, terms = half, grown
    return values[..., :width]


def row_sums(values: torch.Tensor, *, consume: bool = False) -> torch.Tensor:
    """Sums over the last axis in float64, ``[..., D] -> [...]``, without a float64 copy of ``values``.

    Float32 values are added pairwise in float32 (``fold_``) down to at most 64 partial
    sums of about D/64 terms each, and those are added in float64 (the same fixed tree):
    nearly float64 accuracy for about the cost of one pass over ``values``.

    Args:
        values: ``[..., D]``.
        consume: ``values`` may be overwritten (saves a half-size scratch tensor).
    """
    dims = values.shape[-1]
    if values.dtype == torch.float64 or dims <= 64:
        return tree_sum(values.double())
    if not consume:  # fold_'s first step, into a new tensor: ``values`` is left as it was
        half = dims // 2
        scratch = values[..., :half] + values[..., half : 2 * half]
        if dims % 2:
            torch.add(values[..., :1] + values[..., dims - 1 :], values[..., half : half + 1], out=scratch[..., :1])
        values = scratch
    return fold_(fold_(values, torch.add).double(), torch.add, narrowest=1)[..., 0]  # in place: no autograd here


def tree_sum(values: Array, dim: int = -1) -> Array:
    """The sum over ``dim`` of a tensor or NumPy array as a balanced pairwise tree that depends
    only on that axis' length.

    The axis is padded with zeros to a power of two, then each level adds its two halves
    elementwise (exactly rounded), so a row's sum never depends on the other rows, the shape
    or the vector width. Not in place: ``values`` is kept, and autograd works.
    """
    numpy = isinstance(values, np.ndarray)
    values = np.moveaxis(values, dim, -1) if numpy else values.movedim(dim, -1)
    width = values.shape[-1]
    if width == 0:
        return np.zeros(values.shape[:-1], values.dtype) if numpy else values.new_zeros(values.shape[:-1])
    missing = (1 << (width - 1).bit_length()) - width
    if missing:
        values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, missing)]) if numpy else F.pad(values, (0, missing))
    while values.shape[-1] > 1:
        half = values.shape[-1] // 2
        values = values[..., :half] + values[..., half:]
    return values[..., 0]


def logsumexp(values: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log sum exp over ``dim`` in float64, fixed bits: max + log(tree_sum(exp(values - max))).

    The max is taken over finite values (an order-free exact reduction); all -inf gives -inf,
    any +inf gives +inf.
    """
    values = values.double().movedim(dim, -1)
    if values.shape[-1] == 0:
        return values.new_full(values.shape[:-1], -math.inf)
    top = values.amax(-1)
    finite_top = torch.where(top.isfinite(), top, 0.0)
    total = log(tree_sum(exp(values - finite_top[..., None]))) + finite_top
    return torch.where(top.isinf() | top.isnan(), top, total)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
# Stirling's series for lgamma: B_2k / (2k (2k - 1)), k = 1..8, in powers of 1/z²; at z >= 8 the
# first term left out is below 1e-17 of lgamma(z).
_STIRLING = (1 / 12, -1 / 360, 1 / 1260, -1 / 1680, 1 / 1188, -691 / 360360, 1 / 156, -3617 / 122400)
_LGAMMA_SHIFT = 8


def lgamma(x: torch.Tensor) -> torch.Tensor:
    """log Γ(x) for x > 0, float64, with torch's ``log`` and exactly rounded arithmetic only.

    Below 8, Γ(x) = Γ(x + 8) / (x (x + 1) ... (x + 7)); from 8 on, Stirling's series to eight
    terms. Within a few units of 1e-16 of lgamma's larger terms (so an absolute error of
    about 2e-15 where lgamma is near 0, at 1 and 2). torch's own ``lgamma`` changes its last
    bit with the CPU's vector ISA.
    """
    x = x.double()
    small = x < _LGAMMA_SHIFT
    z = torch.where(small, x + _LGAMMA_SHIFT, x)
    product = x.clone()
    for step in range(1, _LGAMMA_SHIFT):
        product *= x + step
    series = _horner(_STIRLING[::-1], 1 / (z * z))
    stirling = (z - 0.5) * torch.log(z) - z + _HALF_LOG_2PI + series / z
    return torch.where(small, stirling - torch.log(torch.where(small, product, 1.0)), stirling)


def log_softmax(values: torch.Tensor) -> torch.Tensor:
    """values - log sum exp(values) over the last axis, with torch's exp and log and a ``tree_sum``."""
    top = values.amax(-1, keepdim=True)
    top = torch.where(top.isfinite(), top, 0.0)
    shifted = values - top
    return shifted - torch.log(tree_sum(torch.exp(shifted)))[..., None]


def logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e**a + e**b) in float64, fixed bits."""
    a, b = torch.broadcast_tensors(a.double(), b.double())
    top, bottom = torch.maximum(a, b), torch.minimum(a, b)
    finite = bottom.isfinite() & top.isfinite()
    gap = torch.where(finite, bottom - top, -math.inf)
    total = top + log1p(exp(gap), log)
    same_infinity = (a == b) & a.isinf()  # -inf + -inf, inf + inf
    return torch.where(same_infinity | ~top.isfinite(), top, total)



# Wichura (1988), "Algorithm AS 241: the percentage points of the normal distribution",
# Applied Statistics 37(3), 477-484: PPND16, relative error about 1e-16. Coefficients from
# the highest power down.
_CENTRAL = (
    (2.5090809287301226727e3, 3.3430575583588128105e4, 6.7265770927008700853e4, 4.5921953931549871457e4,
     1.3731693765509461125e4, 1.9715909503065514427e3, 1.3314166789178437745e2, 3.3871328727963666080e0),
    (5.2264952788528545610e3, 2.8729085735721942674e4, 3.9307895800092710610e4, 2.1213794301586595867e4,
     5.3941960214247511077e3, 6.8718700749205790830e2, 4.2313330701600911252e1, 1.0),
)
_INNER_TAIL = (
    (7.74545014278341407640e-4, 2.27238449892691845833e-2, 2.41780725177450611770e-1, 1.27045825245236838258e0,
     3.64784832476320460504e0, 5.76949722146069140550e0, 4.63033784615654529590e0, 1.42343711074968357734e0),
    (1.05075007164441684324e-9, 5.47593808499534494600e-4, 1.51986665636164571966e-2, 1.48103976427480074590e-1,
     6.89767334985100004550e-1, 1.67638483018380384940e0, 2.05319162663775882187e0, 1.0),
)
_OUTER_TAIL = (
    (2.01033439929228813265e-7, 2.71155556874348757815e-5, 1.24266094738807843860e-3, 2.65321895265761230930e-2,
     2.96560571828504891230e-1, 1.78482653991729133580e0, 5.46378491116411436990e0, 6.65790464350110377720e0),
    (2.04426310338993978564e-15, 1.42151175831644588870e-7, 1.84631831751005468180e-5, 7.86869131145613259100e-4,
     1.48753612908506148525e-2, 1.36929880922735805310e-1, 5.99832206555887937690e-1, 1.0),
)


def _rational(coefficients: tuple[tuple[float, ...], tuple[float, ...]], r: np.ndarray) -> np.ndarray:
    """numerator(r) / denominator(r), each by Horner's rule."""
    numerator = _horner(coefficients[0], r)
    numerator /= _horner(coefficients[1], r)
    return numerator


def ndtri(p: np.ndarray) -> np.ndarray:
    """The standard normal quantile of ``p`` in [0, 1], float64, fixed bits (AS 241, about 1e-16 relative).

    The central 85% is one rational function of (p - 1/2)^2; the tails, computed only for the
    elements that are in them, a rational function of sqrt(-log min(p, 1 - p)). Only exactly
    rounded NumPy arithmetic and ``numerics.log``: the same bits on any CPU, at any position
    (torch's own ``ndtri`` changes its last bit with ``ATEN_CPU_CAPABILITY``).
    """
    shape = np.shape(p)
    p = np.asarray(p, dtype=np.float64).ravel()
    q = p - 0.5
    r = np.multiply(q, q)
    np.subtract(0.180625, r, out=r)
    result = _rational(_CENTRAL, r)
    result *= q
    tail = np.flatnonzero(np.abs(q) > 0.425)
    if tail.size:
        qt = q[tail]
        smaller = np.where(qt < 0, p[tail], 0.5 - qt)  # min(p, 1 - p); 0.5 - q = 1 - p exactly for p > 1/2
        r = np.sqrt(-log(smaller))
        with np.errstate(invalid="ignore"):  # r = inf at p = 0 or 1: inf / inf, set below
            inner = _rational(_INNER_TAIL, r - 1.6)
            far = r > 5.0
            if far.any():
                inner[far] = _rational(_OUTER_TAIL, r[far] - 5.0)
        inner[np.isinf(r)] = np.inf
        result[tail] = np.where(qt < 0, -inner, inner)
    return result.reshape(shape)
