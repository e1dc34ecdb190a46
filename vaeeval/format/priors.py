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
from torch.distributions import (
    Bernoulli,
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    OneHotCategorical,
    kl_divergence,
)

from vaeeval.errors import SpecError
from vaeeval.format.specs import named_tensor
from vaeeval.format.terms import ANALYTIC, MONTE_CARLO


class Prior(ABC):
    """p(z) for one format-1 ``prior`` block, bound to its tensors."""

    family: ClassVar[str]
    kl_kind: ClassVar[str] = ANALYTIC
    keys: ClassVar[frozenset[str]] = frozenset()
    optional: ClassVar[frozenset[str]] = frozenset()  # tensor keys it may leave out
    discrete: ClassVar[bool] = False  # over a discrete latent (``DISCRETE_LATENTS``): the prior of that posterior family

    def __init__(self, spec: Mapping[str, Any], latent_dim: int) -> None:
        self.spec = dict(spec)
        self.latent_dim = latent_dim
        self.values: dict[str, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], latent_dim: int) -> Prior:
        """Check the spec's keys and tensors and build the bound prior."""
        unknown = sorted(set(spec) - cls.keys - cls.optional - {"family"})
        missing = sorted(cls.keys - set(spec))
        if unknown:
            raise SpecError(f"prior: unknown key(s) {', '.join(unknown)} for family {cls.family!r}")
        if missing:
            raise SpecError(f"prior: family {cls.family!r} needs {', '.join(missing)}")
        prior = cls(spec, latent_dim)
        prior.bind({key: _tensor(spec, key, tensors) for key in sorted((cls.keys | cls.optional) & set(spec))})
        return prior

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take this prior's tensors (already checked to exist and be finite), checking their shapes."""
        self.values = dict(tensors)

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of the file tensors this prior reads."""
        return tuple(self.spec[key] for key in sorted((self.keys | self.optional) & set(self.spec)))

    @abstractmethod
    def distribution(self, like: torch.Tensor) -> Distribution:
        """p(z) with event shape ``[latent_dim]``, in the dtype and on the device of ``like``."""

    @property
    def monte_carlo_kl(self) -> bool:
        """KL(q || p) has no closed form: it is estimated from the samples."""
        return self.kl_kind == MONTE_CARLO

    def kl(self, q: Distribution) -> torch.Tensor | None:
        """KL(q || p) per batch element, ``[B]``, for q with event shape ``[latent_dim]``.

        ``None`` when it has no closed form: the evaluation then estimates it by
        Monte Carlo from the same samples as the other terms.
        """
        return kl_divergence(q, self.distribution(q.mean))

    def marginals(self, like: torch.Tensor) -> Normal | None:
        """p(z) as independent Normals per dimension, ``[latent_dim]``; None when it does not factorize so."""
        return None

    def kl_per_dim(self, means: torch.Tensor, variances: torch.Tensor) -> torch.Tensor | None:
        """KL(N(mean, var) || p) per latent dimension, ``[N, L] -> [N, L]``; None when p does not factorize."""
        marginals = self.marginals(means)
        if marginals is None:
            return None
        return kl_divergence(Normal(means, variances.sqrt()), marginals)

    @property
    def noise_width(self) -> int:
        """Standard normal numbers ``sample`` takes per draw."""
        return self.latent_dim

    def sample(self, normal: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """z ~ p(z) from given noise: ``normal [..., noise_width]`` N(0, 1) and ``uniform [...]`` on (0, 1).

        A deterministic function of the noise, so draws keyed by point and chain stay so.
        """
        marginals = self.marginals(normal)
        return marginals.loc + marginals.scale * normal

    def to(self, device: torch.device | str) -> Prior:
        """This prior with its tensors on ``device``."""
        moved = type(self)(self.spec, self.latent_dim)
        moved.values = {key: value.to(device) for key, value in self.values.items()}
        return moved

    def _value(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self.values[key].to(dtype=like.dtype, device=like.device)

    def _check_shape(self, key: str, shape: tuple[int, ...]) -> None:
        found = tuple(self.values[key].shape)
        if found != shape:
            raise SpecError(f"prior: {key} tensor {self.spec[key]!r} is {list(found)}, expected {list(shape)}")


def _tensor(spec: Mapping[str, Any], key: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return named_tensor(tensors, spec[key], f"prior: {key}", finite=True)


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

    def marginals(self, like: torch.Tensor) -> Normal:
        zeros = torch.zeros(self.latent_dim, dtype=like.dtype, device=like.device)
        return Normal(zeros, torch.ones_like(zeros), validate_args=False)

    def distribution(self, like: torch.Tensor) -> Distribution:
        return Independent(self.marginals(like), 1)


@register
class GaussianPrior(Prior):
    """N(mean, diag(exp(log_var))) with learned tensors ``mean`` and ``log_var`` of shape [latent_dim]."""

    family = "gaussian"
    keys = frozenset({"mean", "log_var"})

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().bind(tensors)
        for key in self.keys:
            self._check_shape(key, (self.latent_dim,))

    def marginals(self, like: torch.Tensor) -> Normal:
        mean, log_var = self._value("mean", like), self._value("log_var", like)
        return Normal(mean, (0.5 * log_var).exp(), validate_args=False)

    def distribution(self, like: torch.Tensor) -> Distribution:
        return Independent(self.marginals(like), 1)


@register
class MixturePrior(Prior):
    """A mixture of C diagonal Gaussians: ``logits`` [C], ``means`` and ``log_vars`` [C, latent_dim].

    KL(q || p) has no closed form; it is estimated from the evaluation's own samples.
    """

    family = "mixture_of_gaussians"
    kl_kind = MONTE_CARLO
    keys = frozenset({"logits", "means", "log_vars"})

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().bind(tensors)
        components = tuple(self.values["logits"].shape)
        if len(components) != 1 or components[0] < 1:
            raise SpecError(f"prior: logits tensor {self.spec['logits']!r} is {list(components)}, expected [C], C >= 1")
        for key in ("means", "log_vars"):
            self._check_shape(key, (*components, self.latent_dim))

    def distribution(self, like: torch.Tensor) -> Distribution:
        means, log_vars = self._value("means", like), self._value("log_vars", like)
        components = Independent(Normal(means, (0.5 * log_vars).exp(), validate_args=False), 1)
        mixing = Categorical(logits=self._value("logits", like), validate_args=False)
        return MixtureSameFamily(mixing, components, validate_args=False)

    def kl(self, q: Distribution) -> None:
        return None

    def sample(self, normal: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The component by inverse CDF of the mixing weights at ``uniform``, then its Gaussian."""
        weights = torch.softmax(self._value("logits", normal), dim=0)
        cumulative = torch.cumsum(weights, dim=0)
        component = torch.searchsorted(cumulative, uniform.contiguous()).clamp(max=weights.numel() - 1)
        means, log_vars = self._value("means", normal), self._value("log_vars", normal)
        return means[component] + (0.5 * log_vars[component]).exp() * normal


class _DiscretePrior(Prior):
    """p(z) of a discrete latent (FORMAT.md, "A discrete latent"): uniform, or learned ``logits`` [latent_dim].

    vaeeval evaluates such a model through torch distributions (``user/``): these give p(z)
    there; the KL, keyed draws and exact sums over z are the general path's.
    """

    optional = frozenset({"logits"})
    discrete = True

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().bind(tensors)
        if "logits" in self.values:
            self._check_shape("logits", (self.latent_dim,))

    def logits(self, like: torch.Tensor) -> torch.Tensor:
        """Its logits ``[latent_dim]`` (zeros for the uniform prior), in ``like``'s dtype."""
        if "logits" in self.values:
            return self._value("logits", like)
        return torch.zeros(self.latent_dim, dtype=like.dtype, device=like.device)

    def kl(self, q: Distribution) -> torch.Tensor | None:
        return None  # the general path's analytic KL (``user.distributions.analytic_kl``) takes over

    def sample(self, normal: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a discrete latent's prior is drawn by the general path (user/discrete.py)")


@register
class CategoricalPrior(_DiscretePrior):
    """One of latent_dim categories, z its one-hot vector: ``OneHotCategorical(logits)``."""

    family = "categorical"

    def distribution(self, like: torch.Tensor) -> Distribution:
        return OneHotCategorical(logits=self.logits(like), validate_args=False)


@register
class BernoulliPrior(_DiscretePrior):
    """latent_dim independent binary units: ``Independent(Bernoulli(logits), 1)`` (uniform: every logit 0)."""

    family = "bernoulli"

    def distribution(self, like: torch.Tensor) -> Distribution:
        return Independent(Bernoulli(logits=self.logits(like), validate_args=False), 1)


DISCRETE_LATENTS = (CategoricalPrior.family, BernoulliPrior.family)  # format 1's posterior families besides gaussian
