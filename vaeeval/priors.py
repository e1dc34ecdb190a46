"""Priors p(z): family name -> torch.distributions over one latent vector.

KL(q(z|x) || p(z)) comes from ``torch.distributions.kl_divergence`` where torch
has it in closed form; a prior without one reports a Monte Carlo KL instead
(``kl_kind``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from vaeeval.errors import SpecError


class Prior(ABC):
    """p(z) for one format-1 ``prior`` block, bound to its tensors."""

    family: ClassVar[str]
    kl_kind: ClassVar[str] = "analytic"
    keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: Mapping[str, Any], latent_dim: int) -> None:
        self.spec = dict(spec)
        self.latent_dim = latent_dim

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], latent_dim: int) -> Prior:
        """Check the spec's keys and tensors and build the bound prior."""
        unknown = sorted(set(spec) - cls.keys - {"family"})
        if unknown:
            raise SpecError(f"prior: unknown key(s) {', '.join(unknown)} for family {cls.family!r}")
        return cls(spec, latent_dim)

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of the file tensors this prior reads."""
        return ()

    @abstractmethod
    def distribution(self, like: torch.Tensor) -> Distribution:
        """p(z) with event shape ``[latent_dim]``, in the dtype and on the device of ``like``."""

    def kl(self, q: Distribution) -> torch.Tensor:
        """KL(q || p) per batch element, ``[B]``, for q with event shape ``[latent_dim]``."""
        return kl_divergence(q, self.distribution(q.mean))

    def to(self, device: torch.device | str) -> Prior:
        """This prior with its tensors on ``device``."""
        return self


_FAMILIES: dict[str, type[Prior]] = {}


def register(cls: type[Prior]) -> type[Prior]:
    """Class decorator: make ``cls`` the implementation of ``cls.family``."""
    _FAMILIES[cls.family] = cls
    return cls


def families() -> tuple[str, ...]:
    """The registered prior family names."""
    return tuple(_FAMILIES)


def prior_from_spec(spec: Any, tensors: Mapping[str, torch.Tensor], latent_dim: int) -> Prior:
    """Build the prior of a format-1 ``prior`` block (``None``: the standard normal).

    Raises:
        SpecError: not an object, unknown family, bad keys or tensors.
    """
    if spec is None:
        spec = {"family": "standard_normal"}
    if not isinstance(spec, Mapping) or not isinstance(spec.get("family"), str):
        raise SpecError(f"prior must be an object with a string \"family\", found {spec!r}")
    family = spec["family"]
    if family not in _FAMILIES:
        raise SpecError(f"prior family {family!r} is not supported; known: {', '.join(_FAMILIES)}")
    return _FAMILIES[family].from_spec(spec, tensors, latent_dim)


@register
class StandardNormalPrior(Prior):
    """N(0, I)."""

    family = "standard_normal"

    def distribution(self, like: torch.Tensor) -> Distribution:
        zeros = torch.zeros(self.latent_dim, dtype=like.dtype, device=like.device)
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1)
