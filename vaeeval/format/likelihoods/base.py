"""The likelihood family base class and registry, and the bin arithmetic the families share."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch.distributions import Distribution

from vaeeval.core import numerics
from vaeeval.core.numerics import row_sums
from vaeeval.errors import SpecError, VaeevalError, option
from vaeeval.format.domains import Grid
from vaeeval.format.specs import levels as levels_value
from vaeeval.format.specs import named_tensor
from vaeeval.format.terms import DENSITY

LOG_HALF = math.log(0.5)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LOG_2 = math.log(2.0)
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
        value_range: the [low, high] every value the family scores lies in, where it has one.
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
    value_range: ClassVar[tuple[float, float] | None] = None
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

    def log_bin_probability(self, params: torch.Tensor, x: torch.Tensor, bins: Grid) -> torch.Tensor:
        """log P(bin of x_d | z) per dimension, for data on the grid ``bins`` (continuous families)."""
        raise NotImplementedError(f"{self.family} is already a probability of its {self.levels} levels")

    @abstractmethod
    def outside_support(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the (finite) values of ``x`` this family gives no mass to."""

    def log_prob(self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None) -> torch.Tensor:
        """log p(x|z) per data point, in nats, summed over data dimensions in float64.

        Args:
            params: decoder outputs ``[..., P, *input_shape]``.
            x: data ``[..., *input_shape]``, broadcastable against the batch axes of params.
            bins: score a continuous family as the probability of the data's bins on this
                grid; ``None`` for its density (or a discrete family's probability).

        Returns:
            ``[...]`` float64.
        """
        total = self._summed(params, x, bins)
        overflowed = ~torch.isfinite(total)
        if overflowed.any():
            # Extreme but finite data can overflow float32 (a squared error of 1e40):
            # redo just those rows in float64, so no other row's rounding changes.
            rows = overflowed.nonzero(as_tuple=True)
            x_rows = x.expand(*total.shape, *self.input_shape)[rows]
            total[rows] = self._summed(params[rows].double(), x_rows.double(), bins)
        return total

    def _summed(self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None) -> torch.Tensor:
        return self.sum_terms(self.terms(params, x, bins))

    def terms(self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None) -> torch.Tensor:
        """log p(x_d|z) per data dimension, ``[..., *input_shape]``: what ``log_prob`` sums (differentiable).

        A density's terms (or a probability family's) in the parameters' dtype; the bin
        log-probabilities of a continuous family scored on the grid ``bins`` in float64.
        """
        if bins is None or not self.continuous:
            return self.elementwise_log_prob(params, x)
        return self.log_bin_probability(params.double(), x.double(), bins)

    def sum_terms(self, terms: torch.Tensor) -> torch.Tensor:
        """``terms`` ``[..., *input_shape]`` summed over the data dimensions in float64, ``[...]``."""
        return row_sums(terms.flatten(start_dim=terms.dim() - len(self.input_shape)))

    def loss_statistics(self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None) -> dict[str, torch.Tensor]:
        """Per sample, what ``vaeeval elbo --explain`` writes recon out with besides recon itself.

        Each is summed over the data dimensions in float64, ``[...]`` for ``params [..., P, *input_shape]``
        and ``x`` broadcastable against them. A family gives some of: ``loss`` (the training loss: SSE,
        L1, BCE), ``weighted_loss`` (sum_d |x_d - mu_d|^p / s_d^p, p = 2 or 1), ``log_scale`` (sum_d log s_d),
        ``log_normalizer`` (sum_d log C(lambda_d)) and, scored on the grid ``bins`` (a discrete family: its
        own), ``log_density_width`` (sum_d log(p(x_d|z) w), the density times the bin width beside each
        bin's mass). None here: recon alone writes the family out, or nothing does.
        """
        return {}

    def log_density_width(self, log_density: torch.Tensor, bins: Grid) -> torch.Tensor:
        """sum_d log(p(x_d|z) w) ``[...]`` from log-densities ``[..., *input_shape]``, w = the grid's step."""
        return self.sum_terms(log_density) + math.prod(self.input_shape) * math.log(bins.step)

    def log_prob_and_grad(
        self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) per point (as ``log_prob``) and its gradient in ``params`` (their dtype and shape)."""
        params = params.detach().requires_grad_(True)
        with torch.enable_grad():
            terms = self.terms(params, x, bins)
            (grad,) = torch.autograd.grad(terms, params, grad_outputs=torch.ones_like(terms))
        return self.sum_terms(terms.detach()), grad

    def grad(self, params: torch.Tensor, x: torch.Tensor, bins: Grid | None = None) -> torch.Tensor:
        """The gradient of log p(x|z) in ``params`` alone (HMC's inner leapfrog steps), where a family can skip
        the values; any deterministic function of ``params`` keeps HMC exact, so it may round differently."""
        return self.log_prob_and_grad(params, x, bins)[1]

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
    small = d < LOG_2
    return torch.where(small, torch.log(-numerics.expm1(-d.clamp(max=LOG_2))), torch.log(1 - torch.exp(-d.clamp(min=LOG_2))))


def finite_edges(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bins' edges with the infinite ones (of the open outermost bins) replaced by finite stand-ins.

    Returns:
        lower and upper edges, finite (an open edge becomes one unit beyond the other), and
        where the bin is open below and above. Formulas for a closed bin then stay finite
        (and so do their gradients) where an open bin takes its own, simpler one.
    """
    open_low, open_high = torch.isinf(lower), torch.isinf(upper)
    return torch.where(open_low, upper - 1, lower), torch.where(open_high, lower + 1, upper), open_low, open_high


def bin_edges(x: torch.Tensor, bins: Grid, low_end: float, high_end: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bin [lower, upper] of each value of ``x`` on the grid ``bins``; outermost bins reach the ends.

    On [0, 1] the operations are those of k = round(x (L - 1)), x -/+ 0.5/(L - 1), bit for bit.
    """
    count = bins.levels - 1
    k = bins.nearest(x)
    half = 0.5 * bins.span / count
    lower = torch.where(k <= 0, torch.full_like(x, low_end), x - half)
    upper = torch.where(k >= count, torch.full_like(x, high_end), x + half)
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


def positive_number(spec: Mapping[str, Any], key: str) -> float:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise SpecError(f"likelihood: {key} must be a positive finite number, found {value!r}")
    return float(value)


def spec_levels(spec: Mapping[str, Any], family: str) -> int:
    return levels_value(spec.get("levels"), f"likelihood: {family}")


def scale_tensor(
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

# exp(-87) = 1.6e-38 is still a normal float32: exp(-|l|) is clamped there, never subnormal (subnormal
# arithmetic is many times slower on x86), and 1 + exp(-|l|) is 1 in float32 past |l| = 17 anyway.
NORMAL_EXPONENT = 87.0
