"""Observation models p(x|z): family name -> torch.distributions over one data point.

Each family registers itself. It knows how many decoder outputs it takes per
data dimension (P), which tensors of the file it reads, what data it supports,
and whether its numbers are densities or probabilities. Log-probabilities are
the full normalized ones from torch.distributions, evaluated elementwise in the
model's dtype and summed over the data dimensions in float64.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch.distributions import Bernoulli, Distribution, Normal

from vaeeval.errors import SpecError

DENSITY = "density"
PROBABILITY = "probability"


class Likelihood(ABC):
    """p(x|z) for one format-1 ``likelihood`` block, bound to its tensors.

    Attributes:
        family: the format-1 family name.
        measure: ``"density"`` (nats w.r.t. Lebesgue measure) or ``"probability"``
            (nats of a discrete event).
        support: what data the family takes, in words, for error messages.
        tensor_keys: spec keys whose value names a tensor of the file.
        params_per_dim: P, the decoder outputs per data dimension.
    """

    family: ClassVar[str]
    measure: ClassVar[str]
    support: ClassVar[str]
    keys: ClassVar[frozenset[str]] = frozenset()
    tensor_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: Mapping[str, Any], input_shape: tuple[int, ...], params_per_dim: int) -> None:
        self.spec = dict(spec)
        self.input_shape = tuple(input_shape)
        self.params_per_dim = params_per_dim

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
    @abstractmethod
    def _from_spec(
        cls, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]
    ) -> Likelihood: ...

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of the file tensors this likelihood reads."""
        return tuple(self.spec[key] for key in self.tensor_keys if key in self.spec)

    @abstractmethod
    def distribution(self, params: torch.Tensor) -> Distribution:
        """The elementwise distribution for decoder outputs ``params``.

        Args:
            params: ``[..., P, *input_shape]``.

        Returns:
            A distribution with batch shape ``[..., *input_shape]`` and no event dims.
        """

    @abstractmethod
    def outside_support(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the (finite) values of ``x`` this family gives no mass to."""

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per data point, in nats, summed over data dimensions in float64.

        Args:
            params: decoder outputs ``[..., P, *input_shape]``.
            x: data ``[..., *input_shape]``, broadcastable against the batch axes of params.

        Returns:
            ``[...]`` float64.
        """
        total = self._summed(params, x)
        overflowed = ~torch.isfinite(total)
        if overflowed.any():
            # Extreme but finite data can overflow float32 (a squared error of 1e40):
            # redo just those rows in float64, so no other row's rounding changes.
            rows = overflowed.nonzero(as_tuple=True)
            x_rows = x.expand(*total.shape, *self.input_shape)[rows]
            total[rows] = self._summed(params[rows].double(), x_rows.double())
        return total

    def _summed(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        elementwise = self.distribution(params).log_prob(x)
        return elementwise.double().flatten(start_dim=elementwise.dim() - len(self.input_shape)).sum(-1)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The P parameter blocks of ``params`` ``[..., P, *input_shape]``."""
        return params.unbind(dim=params.dim() - len(self.input_shape) - 1)

    def to(self, device: torch.device | str) -> Likelihood:
        """This likelihood with its tensors on ``device``."""
        return self

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


def _positive_number(spec: Mapping[str, Any], key: str) -> float:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise SpecError(f"likelihood: {key} must be a positive finite number, found {value!r}")
    return float(value)


def _scale_tensor(
    spec: Mapping[str, Any], key: str, tensors: Mapping[str, torch.Tensor], input_shape: tuple[int, ...]
) -> torch.Tensor:
    name = spec[key]
    if not isinstance(name, str) or name not in tensors:
        raise SpecError(f"likelihood: {key} names tensor {name!r}, which the file does not have")
    tensor = tensors[name]
    if tuple(tensor.shape) not in ((), input_shape):
        raise SpecError(
            f"likelihood: {key} tensor {name!r} is {list(tensor.shape)}, expected [] or {list(input_shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise SpecError(f"likelihood: {key} tensor {name!r} has non-finite values")
    return tensor


@register
class GaussianLikelihood(Likelihood):
    """Normal(mean, sigma) per dimension; sigma fixed, a tensor, or a decoder output.

    log p(x|z) = -sum_d (x_d - mu_d)^2 / (2 sigma_d^2) - sum_d log sigma_d - D/2 log(2 pi):
    the squared error is only the first term.
    """

    family = "gaussian"
    measure = DENSITY
    support = "finite real numbers"
    keys = frozenset({"sigma", "log_sigma"})
    tensor_keys = ("log_sigma",)

    def __init__(
        self,
        spec: Mapping[str, Any],
        input_shape: tuple[int, ...],
        params_per_dim: int,
        scale: float | torch.Tensor | None,
    ) -> None:
        super().__init__(spec, input_shape, params_per_dim)
        self.scale = scale  # None: the decoder's second block is log sigma

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        if "sigma" in spec and "log_sigma" in spec:
            raise SpecError("likelihood: give sigma or log_sigma, not both")
        if "sigma" in spec:
            return cls(spec, input_shape, 1, _positive_number(spec, "sigma"))
        if "log_sigma" in spec:
            log_sigma = _scale_tensor(spec, "log_sigma", tensors, input_shape)
            return cls(spec, input_shape, 1, log_sigma.exp())
        return cls(spec, input_shape, 2, None)

    def distribution(self, params: torch.Tensor) -> Distribution:
        blocks = self.split(params)
        scale = blocks[1].exp() if self.scale is None else torch.as_tensor(self.scale, dtype=params.dtype)
        return Normal(blocks[0], scale, validate_args=False)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(x.shape, dtype=bool)

    def to(self, device):
        if isinstance(self.scale, torch.Tensor):
            return type(self)(self.spec, self.input_shape, self.params_per_dim, self.scale.to(device))
        return self


@register
class BernoulliLikelihood(Likelihood):
    """Bernoulli(sigmoid(logit)) per dimension; log p(x|z) is minus the binary cross-entropy."""

    family = "bernoulli"
    measure = PROBABILITY
    support = "exactly 0 or 1"

    @classmethod
    def _from_spec(cls, spec, tensors, input_shape):
        return cls(spec, input_shape, 1)

    def distribution(self, params: torch.Tensor) -> Distribution:
        return Bernoulli(logits=self.split(params)[0], validate_args=False)

    def outside_support(self, x: np.ndarray) -> np.ndarray:
        return (x != 0) & (x != 1)
