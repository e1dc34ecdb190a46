"""Observation models p(x|z): family name -> the log-probability of one data point.

Each family registers itself. It knows how many decoder outputs it takes per
data dimension (P), which tensors of the file it reads, what data it supports,
and whether its numbers are densities or probabilities. Log-probabilities are
the full normalized ones, from torch.distributions where torch has a correct
one, evaluated elementwise and summed over the data dimensions in float64.

A continuous family can also score each dimension as the probability of the
data's bin (FORMAT.md, "Discrete data under a continuous density"): the bin of
value v on L levels is [v - 1/(2(L-1)), v + 1/(2(L-1))], the outermost bins
reaching to the ends of the family's support. Those probabilities are computed
in float64 from log-CDFs in forms that never subtract two nearly equal numbers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch.distributions import Bernoulli, Categorical, ContinuousBernoulli, Distribution, Laplace, Normal
from torch.distributions.utils import broadcast_all

from vaeeval import numerics
from vaeeval.domains import Domain
from vaeeval.errors import SpecError, VaeevalError, option
from vaeeval.estimators import fold_, row_sums
from vaeeval.results import DENSITY, PROBABILITY
from vaeeval.specs import levels as levels_value
from vaeeval.specs import named_tensor

_LOG_HALF = math.log(0.5)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)
BINARY, CATEGORICAL = "binary", "categorical"  # how probabilities become logits: sigmoid or softmax outputs


class Likelihood(ABC):
    """p(x|z) for one format-1 ``likelihood`` block, bound to its tensors.

    Attributes:
        family: the format-1 family name.
        measure: ``"density"`` (nats w.r.t. Lebesgue measure) or ``"probability"``
            (nats of a discrete event).
        support: what data the family takes, in words, for error messages.
        keys: the spec keys the family takes besides ``family``.
        tensor_keys: spec keys whose value names a tensor of the file.
        params_per_dim: P, the decoder outputs per data dimension.
        levels: for a discrete family, the number of values one dimension takes.
        decoder_outputs: what a user's decoder may return for this family, and how
            it becomes format-1 parameters: ``None`` as it is, ``"binary"`` probabilities
            through a sigmoid's inverse, ``"categorical"`` through a softmax's.
        scale_keys: for a location-scale family, the spec keys of a fixed scale and
            of a log-scale tensor.
        values: the tensors the spec names, by spec key, as the file holds them.
    """

    family: ClassVar[str]
    measure: ClassVar[str]
    support: ClassVar[str]
    keys: ClassVar[frozenset[str]] = frozenset()
    tensor_keys: ClassVar[tuple[str, ...]] = ()
    levels: int | None = None
    linear_shortcut: ClassVar[bool] = False  # log_prob_through_linear is implemented
    decoder_outputs: ClassVar[Mapping[str, str | None]] = {"logits": None}
    scale_keys: ClassVar[tuple[str, str] | None] = None

    def __init__(self, spec: Mapping[str, Any], input_shape: tuple[int, ...], params_per_dim: int) -> None:
        self.spec = dict(spec)
        self.input_shape = tuple(input_shape)
        self.params_per_dim = params_per_dim
        self.values: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> Likelihood:
        """Check the spec's keys and tensors and build the bound likelihood."""
        unknown = sorted(set(spec) - cls.keys - {"family"})
        if unknown:
            raise SpecError(f"likelihood: unknown key(s) {', '.join(unknown)} for family {cls.family!r}")
        return cls._from_spec(spec, tensors, tuple(input_shape))

    @classmethod
    def _from_spec(
        cls, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> Likelihood:
        return cls(spec, input_shape, 1)

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of the file tensors this likelihood reads."""
        return tuple(self.spec[key] for key in self.tensor_keys if key in self.spec)

    @property
    def continuous(self) -> bool:
        """True for families whose numbers are densities."""
        return self.measure == DENSITY

    def distribution(self, params: torch.Tensor) -> Distribution:
        """The elementwise torch distribution for decoder outputs ``params [..., P, *input_shape]``."""
        raise NotImplementedError(f"{self.family} has no torch distribution")

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x_d|z) per data dimension: ``params [..., P, *input_shape]``, ``x [..., *input_shape]``."""
        return self.distribution(params).log_prob(x)

    def log_bin_probability(self, params: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
        """log P(bin of x_d | z) per dimension, for data on ``levels`` levels (continuous families)."""
        raise NotImplementedError(f"{self.family} is already a probability of its {self.levels} levels")

    @abstractmethod
    def outside_support(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the (finite) values of ``x`` this family gives no mass to."""

    def log_prob(self, params: torch.Tensor, x: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """log p(x|z) per data point, in nats, summed over data dimensions in float64.

        Args:
            params: decoder outputs ``[..., P, *input_shape]``.
            x: data ``[..., *input_shape]``, broadcastable against the batch axes of params.
            levels: score a continuous family as the probability of the data's bins on this
                many levels; ``None`` for its density (or a discrete family's probability).

        Returns:
            ``[...]`` float64.
        """
        total = self._summed(params, x, levels)
        overflowed = ~torch.isfinite(total)
        if overflowed.any():
            # Extreme but finite data can overflow float32 (a squared error of 1e40):
            # redo just those rows in float64, so no other row's rounding changes.
            rows = overflowed.nonzero(as_tuple=True)
            x_rows = x.expand(*total.shape, *self.input_shape)[rows]
            total[rows] = self._summed(params[rows].double(), x_rows.double(), levels)
        return total

    def _summed(self, params: torch.Tensor, x: torch.Tensor, levels: int | None) -> torch.Tensor:
        return self.sum_terms(self.terms(params, x, levels))

    def terms(self, params: torch.Tensor, x: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """log p(x_d|z) per data dimension, ``[..., *input_shape]``: what ``log_prob`` sums (differentiable).

        A density's terms (or a probability family's) in the parameters' dtype; the bin
        log-probabilities of a continuous family scored on ``levels`` levels in float64.
        """
        if levels is None or not self.continuous:
            return self.elementwise_log_prob(params, x)
        return self.log_bin_probability(params.double(), x.double(), levels)

    def sum_terms(self, terms: torch.Tensor) -> torch.Tensor:
        """``terms`` ``[..., *input_shape]`` summed over the data dimensions in float64, ``[...]``."""
        return row_sums(terms.flatten(start_dim=terms.dim() - len(self.input_shape)))

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, levels: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) per point (as ``log_prob``) and its gradient in ``params`` (their dtype and shape)."""
        params = params.detach().requires_grad_(True)
        with torch.enable_grad():
            terms = self.terms(params, x, levels)
            (grad,) = torch.autograd.grad(terms, params, grad_outputs=torch.ones_like(terms))
        return self.sum_terms(terms.detach()), grad

    def log_prob_through_linear(
        self, hidden: torch.Tensor, logits: torch.Tensor, projected: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        """log p(x|z) when the decoder ends in a linear layer, for families that allow the shortcut.

        Args:
            hidden: ``[B, S, H]`` the last linear layer's input.
            logits: ``[B, S, D]`` its output (consumed: it may be overwritten).
            projected, offset: from ``linear_projection``, once per point.

        Returns:
            ``[B, S]`` float64.
        """
        raise NotImplementedError(f"{self.family} has no linear-layer shortcut")

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The P parameter blocks of ``params`` ``[..., P, *input_shape]``."""
        return params.unbind(dim=self._param_axis(params))

    def _param_axis(self, params: torch.Tensor) -> int:
        return params.dim() - len(self.input_shape) - 1

    def to(self, device: torch.device | str) -> Likelihood:
        """This likelihood with its tensors on ``device``."""
        return self

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """x ~ p(x|z) by the inverse CDF at ``uniform`` ``[..., *input_shape]`` (draws on (0, 1)).

        A deterministic function of the given noise, so simulated points can be keyed by index.
        """
        return self.distribution(params).icdf(uniform)

    def verification_points(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        """Points in the family's support, ``[*shape]`` float32, to check a conversion on."""
        if self.levels is not None:
            return (rng.integers(0, self.levels, shape) / (self.levels - 1)).astype(np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


_FAMILIES: dict[str, type[Likelihood]] = {}


def register(cls: type[Likelihood]) -> type[Likelihood]:
    """Class decorator: make ``cls`` the implementation of ``cls.family``."""
    _FAMILIES[cls.family] = cls
    return cls


def families() -> tuple[str, ...]:
    """The registered family names."""
    return tuple(_FAMILIES)


def family(name: str) -> type[Likelihood]:
    """The class registered for family ``name``.

    Raises:
        VaeevalError: no such family.
    """
    if name not in _FAMILIES:
        raise VaeevalError(f"{option('likelihood')} {name!r} is not a family; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def likelihood_spec(
    name: str, *, sigma: float | None = None, log_sigma_tensor: str | None = None, levels: int | None = None
) -> dict[str, Any]:
    """A ``likelihood`` block for family ``name`` from the values a user gives by hand.

    Args:
        sigma: a fixed scale (Gaussian sigma, Laplace scale).
        log_sigma_tensor: the name of a tensor holding log sigma (Gaussian) or the log-scale (Laplace).
        levels: levels of a categorical or discretized logistic family.

    Raises:
        VaeevalError: a value the family does not take, naming its parameter.
    """
    cls = family(name)
    scale_key, log_scale_key = cls.scale_keys or (None, None)
    spec: dict[str, Any] = {"family": name}
    for value, key, parameter in (
        (sigma, scale_key, "sigma"),
        (log_sigma_tensor, log_scale_key, "log_sigma_tensor"),
        (levels, "levels" if "levels" in cls.keys else None, "levels"),
    ):
        if value is not None:
            if key is None:
                raise VaeevalError(f"{option(parameter)} does not apply to a {name} likelihood")
            spec[key] = value
    return spec


def likelihood_from_spec(
    spec: Any, tensors: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]
) -> Likelihood:
    """Build the likelihood of a format-1 ``likelihood`` block.

    Raises:
        SpecError: not an object, unknown family, bad keys or tensors.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("family"), str):
        raise SpecError(f"likelihood must be an object with a string \"family\", found {spec!r}")
    family = spec["family"]
    if family not in _FAMILIES:
        raise SpecError(f"likelihood family {family!r} is not supported; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[family].from_spec(spec, tensors, input_shape)


# ---------------------------------------------------------------- stable pieces


def log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-d)) for d > 0, accurate for small and large d (Maechler 2012).

    Above log 2, 1 - exp(-d) >= 1/2 is exact enough for ``log``; below, ``numerics.expm1``
    (torch's own depends on the element's position and the CPU's ISA). Each
    branch sees only its own range, so neither sends an infinite gradient through the other.
    """
    small = d < _LOG_2
    return torch.where(small, torch.log(-numerics.expm1(-d.clamp(max=_LOG_2))), torch.log(1 - torch.exp(-d.clamp(min=_LOG_2))))


def finite_edges(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bins' edges with the infinite ones (of the open outermost bins) replaced by finite stand-ins.

    Returns:
        lower and upper edges, finite (an open edge becomes one unit beyond the other), and
        where the bin is open below and above. Formulas for a closed bin then stay finite
        (and so do their gradients) where an open bin takes its own, simpler one.
    """
    open_low, open_high = torch.isinf(lower), torch.isinf(upper)
    return torch.where(open_low, upper - 1, lower), torch.where(open_high, lower + 1, upper), open_low, open_high


def bin_edges(x: torch.Tensor, levels: int, low_end: float, high_end: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin [lower, upper] of each value of ``x`` on the k/(L-1) grid; outermost bins reach the ends."""
    step = levels - 1
    k = torch.round(x * step)
    half = 0.5 / step
    lower = torch.where(k <= 0, torch.full_like(x, low_end), x - half)
    upper = torch.where(k >= step, torch.full_like(x, high_end), x + half)
    return lower, upper


def log_symmetric_bin(
    log_cdf: Callable[[torch.Tensor], torch.Tensor],
    a: torch.Tensor,
    b: torch.Tensor,
    open_low: torch.Tensor,
    open_high: torch.Tensor,
) -> torch.Tensor:
    """log(F(b) - F(a)) for a standardized distribution symmetric about 0, a < b.

    The bin is mirrored into the left half (F(b) - F(a) = F(-a) - F(-b)), where
    F is small and its log accurate; then log F(hi) + log(1 - F(lo)/F(hi)). A bin open
    below is log F(b), one open above log F(-a) (``a`` and ``b`` are then finite
    stand-ins, ``finite_edges``): two evaluations of F per element in every case.
    """
    mirror = (a + b) > 0
    lo, hi = torch.where(mirror, -b, a), torch.where(mirror, -a, b)
    opened = open_low | open_high
    hi = torch.where(open_low, b, torch.where(open_high, -a, hi))
    lo = torch.where(opened, hi - 1, lo)
    log_hi = log_cdf(hi)
    return log_hi + torch.where(opened, 0.0, log1mexp(log_hi - log_cdf(lo)))


def _positive_number(spec: Mapping[str, Any], key: str) -> float:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise SpecError(f"likelihood: {key} must be a positive finite number, found {value!r}")
    return float(value)


def _levels(spec: Mapping[str, Any], family: str) -> int:
    return levels_value(spec.get("levels"), f"likelihood: {family}")


def _scale_tensor(
    spec: Mapping[str, Any], key: str, tensors: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]
) -> torch.Tensor:
    name = spec[key]
    tensor = named_tensor(tensors, name, f"likelihood: {key}", finite=True)
    if tuple(tensor.shape) not in ((), input_shape):
        raise SpecError(
            f"likelihood: {key} tensor {name!r} is {list(tensor.shape)}, expected [] or {list(input_shape)}"
        )
    return tensor


# ---------------------------------------------------------------- discrete families


@register
class BernoulliLikelihood(Likelihood):
    """Bernoulli(sigmoid(logit)) per dimension; log p(x|z) is minus the binary cross-entropy."""

    family = "bernoulli"
    measure = PROBABILITY
    support = "exactly 0 or 1"
    levels = 2
    linear_shortcut = True
    decoder_outputs = {"logits": None, "probs": BINARY, "mean": BINARY}

    def distribution(self, params: torch.Tensor) -> Distribution:
        return Bernoulli(logits=self.split(params)[0], validate_args=False)

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x l - softplus(l): torch's Bernoulli (binary cross-entropy) changes its last bit with the ISA."""
        logits = self.split(params)[0]
        return x * logits - numerics.softplus(logits)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return (x != 0) & (x != 1)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        return (torch.log(uniform) < -numerics.softplus(-self.split(params)[0])).to(params.dtype)

    def log_prob_through_linear(self, hidden, logits, projected, offset):
        """sum_d x_d l_d - softplus(l_d), through the last linear layer l = W h + b; overwrites ``hidden`` and ``logits``.

        softplus(l) = l/2 + |l|/2 + log(1 + exp(-|l|)), and sum_d (x_d - 1/2) l_d = h . ((x - 1/2) W) + (x - 1/2) . b
        costs one dot product per sample. What is left per element is one exp; the logs
        are taken of products of up to 16 factors 1 + exp(-|l|), each in (1, 2], which
        costs a sixteenth of a log per element and loses nothing beside the float32
        rounding of |l|/2 in the same sum. Every step is exactly rounded or position-independent
        on the CPU (torch's softplus is not), so a row's result is the same in any batch.
        """
        agreement = row_sums(hidden.mul_(projected[:, None, :]), consume=True) + offset[:, None]
        negative = logits.copysign_(-1.0)  # -|l|, one pass
        halves = row_sums(negative).mul_(-0.5)
        factors = negative.clamp_(min=-_NORMAL_EXPONENT).exp_().add_(1)  # 1 + exp(-|l|), never subnormal, in place
        products = fold_(factors, torch.mul, most=16)
        return agreement - halves - row_sums(products.double().log_())

    def log_prob_and_grad_through_linear(
        self, hidden: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, projected: torch.Tensor, offset: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_prob_through_linear`` and the gradient in the logits, x - sigmoid(l), sharing one exp per element.

        Args:
            hidden: ``[B, S, H]`` the last linear layer's input (read, not overwritten).
            logits: ``[B, S, D]`` its output (consumed).
            x: ``[B, 1, D]`` the data.
            projected, offset: from ``linear_projection``.

        Returns:
            ``[B, S]`` float64 log p(x|z) and ``[B, S, D]`` its gradient in the logits.
        """
        agreement = row_sums(hidden * projected[:, None, :], consume=True) + offset[:, None]
        negative = torch.copysign(logits, -1.0)
        halves = row_sums(negative).mul_(-0.5)
        factors = negative.clamp_(min=-_NORMAL_EXPONENT).exp_().add_(1)  # 1 + exp(-|l|), in (1, 2], never subnormal
        # sigmoid(l) - 1/2 = sign(l) (sigmoid(|l|) - 1/2), so x - sigmoid(l) = (x - 1/2) - copysign(sigmoid(|l|) - 1/2, l)
        grad = factors.reciprocal().sub_(0.5).copysign_(logits)
        torch.sub(x - 0.5, grad, out=grad)
        products = fold_(factors, torch.mul, most=16)
        return agreement - halves - row_sums(products.double().log_()), grad

    def linear_projection(self, x: torch.Tensor, head: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """``((x - 1/2) W, (x - 1/2) . b)`` for ``x [B, D]``: what ``log_prob_through_linear`` needs per point."""
        centered = x - 0.5
        offset = row_sums(centered * head.bias) if head.bias is not None else centered.new_zeros(x.shape[0], dtype=torch.float64)
        return centered @ head.weight, offset


# exp(-87) = 1.6e-38 is still a normal float32: exp(-|l|) is clamped there, never subnormal (subnormal
# arithmetic is many times slower on x86), and 1 + exp(-|l|) is 1 in float32 past |l| = 17 anyway.
_NORMAL_EXPONENT = 87.0


class _GridLikelihood(Likelihood):
    """A discrete family over the L values k/(L-1), k = 0..L-1."""

    measure = PROBABILITY
    keys = frozenset({"levels"})

    def __init__(self, spec: Mapping[str, Any], input_shape: tuple[int, ...], params_per_dim: int) -> None:
        super().__init__(spec, input_shape, params_per_dim)
        self.levels = int(spec["levels"])

    @property
    def support(self) -> str:  # type: ignore[override]
        return f"values k/{self.levels - 1} for k = 0..{self.levels - 1}"

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return Domain("discrete", self.levels).outside(x)


@register
class CategoricalLikelihood(_GridLikelihood):
    """Categorical over L levels per dimension; the decoder gives L blocks of logits."""

    family = "categorical"
    decoder_outputs = {"logits": None, "probs": CATEGORICAL}

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        return cls(spec, input_shape, _levels(spec, cls.family))

    def distribution(self, params: torch.Tensor) -> Distribution:
        return Categorical(logits=params.movedim(self._param_axis(params), -1), validate_args=False)

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log softmax(l)_k at each value's level k (``numerics.log_softmax``, fixed bits on any ISA)."""
        normalized = numerics.log_softmax(params.movedim(self._param_axis(params), -1))
        level = torch.round(x * (self.levels - 1)).long().expand(normalized.shape[:-1])[..., None]
        return normalized.gather(-1, level).squeeze(-1)

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, levels: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log softmax(l)_k at each value's level k, and its gradient in closed form: onehot(k) - softmax(l)."""
        axis = self._param_axis(params)
        logits = params.movedim(axis, -1)
        normalized = numerics.log_softmax(logits)
        level = torch.round(x * (self.levels - 1)).long().expand(normalized.shape[:-1])[..., None]
        terms = normalized.gather(-1, level).squeeze(-1)
        grad = normalized.exp().neg_().scatter_add_(-1, level, torch.ones_like(level, dtype=normalized.dtype))
        return self.sum_terms(terms), grad.movedim(-1, axis)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(params.movedim(self._param_axis(params), -1), dim=-1)
        below = (probabilities.cumsum(-1) < uniform[..., None]).sum(-1).clamp(max=self.levels - 1)
        return below.to(params.dtype) / (self.levels - 1)


@register
class DiscretizedLogisticLikelihood(_GridLikelihood):
    """Logistic(mean, scale) integrated over the bins of L levels on [0, 1], edge bins open (Salimans et al. 2017).

    P(bin [a, b]) = sigmoid(u_b) - sigmoid(u_a) = sigmoid(u_b) sigmoid(-u_a) (1 - exp(-(u_b - u_a)))
    with u = (edge - mean) / scale: every factor is computed without cancellation.
    """

    family = "discretized_logistic"

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        _levels(spec, cls.family)
        return cls(spec, input_shape, 2)

    def elementwise_log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mean, log_scale = self.split(params)
        edges = bin_edges(x.to(params.dtype).expand_as(mean), self.levels, -math.inf, math.inf)
        lower, upper, open_low, open_high = finite_edges(*edges)
        inv_scale = torch.exp(-log_scale)
        u_a, u_b = (lower - mean) * inv_scale, (upper - mean) * inv_scale
        width = (upper - lower) * inv_scale  # the edges' difference, not u_b - u_a: no cancellation
        below, above = -numerics.softplus(-u_b), -numerics.softplus(u_a)  # log P(X <= b), log P(X >= a)
        return torch.where(open_low, below, torch.where(open_high, above, below + above + log1mexp(width)))

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """A logistic draw, binned: the edge bins are open, so values beyond [0, 1] fall into them."""
        mean, log_scale = self.split(params)
        value = mean + torch.exp(log_scale) * (torch.log(uniform) - numerics.log1p(-uniform))
        step = self.levels - 1
        return torch.round(value.clamp(0, 1) * step) / step


# ---------------------------------------------------------------- continuous families


class _LocationScale(Likelihood):
    """A symmetric location-scale family; scale fixed, a tensor, or a decoder output (P = 2)."""

    measure = DENSITY
    support = "finite real numbers"
    base: ClassVar[type[Distribution]]
    scale_key: ClassVar[str]
    log_scale_key: ClassVar[str]

    decoder_outputs = {"logits": None, "mean": None}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.keys = frozenset({cls.scale_key, cls.log_scale_key})
        cls.tensor_keys = (cls.log_scale_key,)
        cls.scale_keys = (cls.scale_key, cls.log_scale_key)

    def __init__(
        self,
        spec: Mapping[str, Any],
        input_shape: tuple[int, ...],
        params_per_dim: int,
        scale: float | torch.Tensor | None,
    ) -> None:
        super().__init__(spec, input_shape, params_per_dim)
        self.scale = scale  # None: the decoder's second block is the log-scale

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        if cls.scale_key in spec and cls.log_scale_key in spec:
            raise SpecError(f"likelihood: give {cls.scale_key} or {cls.log_scale_key}, not both")
        if cls.scale_key in spec:
            return cls(spec, input_shape, 1, _positive_number(spec, cls.scale_key))
        if cls.log_scale_key in spec:
            log_scale = _scale_tensor(spec, cls.log_scale_key, tensors, input_shape)
            likelihood = cls(spec, input_shape, 1, log_scale.exp())
            likelihood.values = {cls.log_scale_key: log_scale}
            return likelihood
        return cls(spec, input_shape, 2, None)

    def location_scale(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.split(params)
        if self.scale is None:
            return blocks[0], blocks[1].exp()
        return blocks[0], torch.as_tensor(self.scale, dtype=params.dtype, device=params.device)

    def distribution(self, params: torch.Tensor) -> Distribution:
        return self.base(*self.location_scale(params), validate_args=False)

    @staticmethod
    @abstractmethod
    def standard_log_cdf(t: torch.Tensor) -> torch.Tensor:
        """log F(t) of the standardized family."""

    @staticmethod
    @abstractmethod
    def standard_log_pdf(t: torch.Tensor) -> torch.Tensor:
        """log f(t) of the standardized family."""

    def _standardized_bins(self, params: torch.Tensor, x: torch.Tensor, levels: int):
        location, scale = self.location_scale(params)
        lower, upper, open_low, open_high = finite_edges(*bin_edges(x.expand_as(location), levels, -math.inf, math.inf))
        return (lower - location) / scale, (upper - location) / scale, open_low, open_high, scale

    def log_bin_probability(self, params: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
        a, b, open_low, open_high, _ = self._standardized_bins(params, x, levels)
        return log_symmetric_bin(self.standard_log_cdf, a, b, open_low, open_high)

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, levels: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """On bins, the gradient in closed form: with a, b the bin's standardized edges and P its probability,
        d log P / d location = -(f(b) - f(a)) / (scale P) and d log P / d log scale = -(b f(b) - a f(a)) / P
        (an open edge contributes nothing); each ratio f / P is taken as exp(log f - log P)."""
        if levels is None:
            return super().log_prob_and_grad(params, x, levels)
        wide = params.double()
        a, b, open_low, open_high, scale = self._standardized_bins(wide, x.double(), levels)
        terms = log_symmetric_bin(self.standard_log_cdf, a, b, open_low, open_high)
        at_b = torch.where(open_high, 0.0, torch.exp(self.standard_log_pdf(b) - terms))
        at_a = torch.where(open_low, 0.0, torch.exp(self.standard_log_pdf(a) - terms))
        grads = [-(at_b - at_a) / scale]
        if self.scale is None:  # the decoder's second block is the log-scale
            grads.append(-(b * at_b - a * at_a))
        grad = torch.stack(grads, dim=self._param_axis(params)).to(params.dtype)
        return self.sum_terms(terms), grad

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(x.shape, dtype=bool)

    def to(self, device):
        if isinstance(self.scale, torch.Tensor):
            moved = type(self)(self.spec, self.input_shape, self.params_per_dim, self.scale.to(device))
            moved.values = self.values
            return moved
        return self


@register
class GaussianLikelihood(_LocationScale):
    """Normal(mean, sigma) per dimension.

    log p(x|z) = -sum_d (x_d - mu_d)^2 / (2 sigma_d^2) - sum_d log sigma_d - D/2 log(2 pi):
    the squared error is only the first term.
    """

    family = "gaussian"
    base = Normal
    scale_key, log_scale_key = "sigma", "log_sigma"

    @staticmethod
    def standard_log_cdf(t: torch.Tensor) -> torch.Tensor:
        return torch.special.log_ndtr(t)

    @staticmethod
    def standard_log_pdf(t: torch.Tensor) -> torch.Tensor:
        return -0.5 * t * t - _HALF_LOG_2PI


@register
class LaplaceLikelihood(_LocationScale):
    """Laplace(location, scale) per dimension: log p = -|x - mu| / b - log(2 b)."""

    family = "laplace"
    base = Laplace
    scale_key, log_scale_key = "scale", "log_scale"

    @staticmethod
    def standard_log_cdf(t: torch.Tensor) -> torch.Tensor:
        # F(t) = exp(t) / 2 below 0 and 1 - exp(-t) / 2 above; clamps keep the unused branch finite
        return torch.where(t < 0, _LOG_HALF + t.clamp(max=0), torch.log(1 - 0.5 * torch.exp(-t.clamp(min=0))))

    @staticmethod
    def standard_log_pdf(t: torch.Tensor) -> torch.Tensor:
        return _LOG_HALF - t.abs()


class StableContinuousBernoulli(ContinuousBernoulli):
    """torch's ContinuousBernoulli whose ``log_prob`` takes its log-normalizer from the logits.

    torch computes log C from clamped probabilities, so for |logit| > ~16 in
    float32 it stops growing (0.6 nats per dimension too low at logit 30). In
    logits eta, C = eta / tanh(eta / 2), and with a = |eta|
    log C = log a - log(1 - exp(-a)) + log(1 + exp(-a)), whose pieces are stable
    for all a; below 1e-2 the series log 2 + a^2/12 - 7 a^4/1440 is used.
    ``log_prob`` is torch's own formula (minus the binary cross-entropy, plus log C)
    with that log C, written out here rather than through torch's private hook, and the
    cross-entropy as x l - softplus(l) (``numerics``: fixed bits on any ISA).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, value = broadcast_all(self.logits, value)
        return value * logits - numerics.softplus(logits) + continuous_bernoulli_log_norm(self.logits)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(eta) of the continuous Bernoulli (Loaiza-Ganem & Cunningham 2019), stable for any logit."""
    a = logits.abs()
    safe = a.clamp(min=1e-2)
    exact = torch.log(safe) - torch.log(-numerics.expm1(-safe)) + torch.log(1 + torch.exp(-safe))
    series = math.log(2.0) + a**2 / 12 - 7 * a**4 / 1440
    return torch.where(a < 1e-2, series, exact)


@register
class ContinuousBernoulliLikelihood(Likelihood):
    """Continuous Bernoulli on [0, 1] per dimension; the decoder gives logits."""

    family = "continuous_bernoulli"
    measure = DENSITY
    support = "values in [0, 1]"
    decoder_outputs = {"logits": None, "probs": BINARY}

    def distribution(self, params: torch.Tensor) -> Distribution:
        return StableContinuousBernoulli(logits=self.split(params)[0], validate_args=False)

    def log_bin_probability(self, params: torch.Tensor, x: torch.Tensor, levels: int) -> torch.Tensor:
        """P([a, b]) = (e^(b eta) - e^(a eta)) / (e^eta - 1), in logs without cancellation."""
        eta = self.split(params)[0]
        a, b = bin_edges(x.expand_as(eta), levels, 0.0, 1.0)
        size = eta.abs().clamp(min=1e-300)
        exact = torch.where(eta > 0, (b - 1) * eta, a * eta) + log1mexp((b - a) * size) - log1mexp(size)
        near_zero = torch.log(b - a) + (a + b - 1) * eta / 2  # first order in eta, error O(eta^2)
        return torch.where(eta.abs() < 1e-6, near_zero, exact)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return (x < 0) | (x > 1)

    def verification_points(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        return rng.random(shape).astype(np.float32)

    def sample(self, params: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The inverse CDF log(1 + u (e^eta - 1)) / eta, in forms that neither overflow nor cancel."""
        eta = self.split(params)[0]
        safe = torch.where(eta.abs() < 1e-6, torch.ones_like(eta), eta)
        positive = 1 + torch.log(uniform + (1 - uniform) * torch.exp(-safe.clamp(min=0))) / safe
        negative = numerics.log1p(uniform * numerics.expm1(safe.clamp(max=0))) / safe
        return torch.where(eta.abs() < 1e-6, uniform, torch.where(eta > 0, positive, negative))


# The count families (Poisson, negative binomial, zero-inflated) register themselves on import.
from vaeeval import counts as _counts  # noqa: E402,F401  (after Likelihood and register exist)
