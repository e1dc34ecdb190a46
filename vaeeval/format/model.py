"""A format-1 model (FORMAT.md) once loaded: its encoder and decoder chains, likelihood, prior and data.

``reading.load_model`` builds one from a file, checked as a whole; ``saving.save_model``
writes one. ``rows_independently`` is how every network call is made, so that a row's
numbers never depend on the rows beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaeeval.errors import VaeevalError
from vaeeval.format.domains import Domain, domain_from_spec
from vaeeval.format.layers import Shape
from vaeeval.format.library import Library
from vaeeval.format.likelihoods import Likelihood
from vaeeval.format.priors import Prior

FORMAT_VERSION = 1
METADATA_KEY = "vaeeval"

# BLAS takes another code path, which rounds differently, for a handful of rows.
# Padding every network call to at least this many rows keeps each point's
# numbers independent of the batch it was evaluated in.
MIN_ROWS = 64


@dataclass(frozen=True)
class LayerInfo:
    """One layer as ``vaeeval inspect`` shows it."""

    part: str
    index: int
    type: str
    detail: str
    out_shape: Shape
    parameters: int


@dataclass(frozen=True)
class Hierarchy:
    """Format 1's second latent group (FORMAT.md, "Two latent groups"): z2 [latent_dim] above z1, the
    bottom-up q(z1|x) q(z2|z1) and the top-down p(z2) p(z1|z2) of Burda et al.'s two-layer models."""

    latent_dim: int  # z2's
    encoder: nn.Module  # q(z2|z1): z1 -> [2 latent_dim], mean then log-variance
    prior: nn.Module  # p(z1|z2): z2 -> [2 z1's latent_dim], mean then log-variance


@dataclass(frozen=True)
class Model:
    """A loaded, validated VAE: encoder q(z|x), decoder, likelihood p(x|z) and prior p(z)."""

    encoder: nn.Sequential
    decoder: nn.Sequential
    likelihood: Likelihood
    prior: Prior
    input_shape: Shape
    latent_dim: int
    domain: Domain | None = None
    description: str = ""
    layers: tuple[LayerInfo, ...] = ()
    path: Path | None = None
    digest: str | None = None  # of the file read: the model, or the weights of an --arch model
    arch: str | None = None  # the class an --arch model was read through (None: format 1)
    extra_parameters: int = 0  # likelihood and prior tensors
    decoder_width: int = 0  # the widest decoder activation per sample, for memory budgets
    general: bool = False  # evaluated through torch distributions (protocol.ArchModel), not format 1's fast path
    notes: tuple[str, ...] = ()  # what the output must say about how the model was read (an assumed prior, a warning)
    data_layer: str | None = None  # the AnnData layer holding the counts (format 1's data.layer); None: X
    categories: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # a categorical covariate's labels, by name
    covariates: tuple[str, ...] = ()  # what encoder and decoder are conditioned on, by name: the numbers are log p(x | c)
    covariate_sizes: Mapping[str, int] = field(default_factory=dict)  # a continuous covariate's values per point, by name
    library: Library | None = None  # a count model's library size (FORMAT.md, "Library size")
    variance_floor: float = 0.0  # q(z|x)'s variance is exp(log-variance) + this
    posterior_family: str = "gaussian"  # q(z|x): a diagonal Gaussian, or a discrete latent (categorical, bernoulli)
    hierarchy: Hierarchy | None = None  # a second latent group z2 above z (then ``latent_dim`` is z1's, and the prior z2's)
    calibration: Mapping[str, Any] | None = None  # how its likelihood's scale was fitted (vaeeval calibrate), if it was

    @property
    def expected_range(self) -> tuple[float, float, str] | None:
        """The [low, high] its data must lie in, and what says so: its likelihood's support, its ``data``
        block's domain, or the data its scale was calibrated on; None where nothing bounds it."""
        if self.likelihood.value_range is not None:
            return (*self.likelihood.value_range, f"the {self.likelihood.family} likelihood scores {self.likelihood.support}")
        if self.domain is not None and self.domain.bounded is not None:
            return (*self.domain.bounded, f"the model declares {self.domain.describe()}")
        calibrated = domain_from_spec(self.calibration["data"].get("domain")) if self.calibration else None
        if calibrated is not None and calibrated.bounded is not None:
            return (*calibrated.bounded, f"its scale was calibrated on {calibrated.describe()}")
        return None

    @property
    def latent_library(self) -> bool:
        """The last latent unit is a library size (standardized: ``Library``)."""
        return self.library is not None and self.library.latent

    @property
    def data_dims(self) -> int:
        """D, the number of dimensions of one data point."""
        return math.prod(self.input_shape)

    @property
    def decode_shape(self) -> Shape:
        """``(P, *input_shape)``: the decoder's output per latent vector, as the likelihood reads it."""
        return (self.likelihood.params_per_dim, *self.input_shape)

    @property
    def parameter_count(self) -> int:
        """Number of weights in the encoder, decoder, likelihood and prior."""
        return sum(layer.parameters for layer in self.layers) + self.extra_parameters

    def to(self, device: torch.device | str) -> Model:
        """The same model with its tensors on ``device``."""
        return replace(
            self,
            encoder=self.encoder.to(device),
            decoder=self.decoder.to(device),
            likelihood=self.likelihood.to(device),
            prior=self.prior.to(device),
            library=None if self.library is None else self.library.to(device),
        )

    def encoded_covariates(self, covariates: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The points' covariates as layers take them: a categorical one one-hot, a continuous one ``[N, size]`` float32.

        Raises:
            VaeevalError: a covariate the model needs is missing.
        """
        given = covariates or {}
        missing = [name for name in self.covariates if name not in given]
        if missing:
            raise VaeevalError(f"the model is conditioned on {', '.join(self.covariates)}; {missing[0]!r} was not given")
        encoded = {}
        for name in self.covariates:
            value = given[name]
            if name in self.categories:
                encoded[name] = F.one_hot(value.reshape(-1).long(), len(self.categories[name])).to(torch.float32)
            else:
                encoded[name] = value.reshape(value.shape[0], -1).to(torch.float32)
        return encoded

    def encode(self, x: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters: ``x [B, *input_shape]`` -> ``(mean, log_var)``, each ``[B, latent_dim]``.

        ``covariates`` are the points' own (name -> ``[B]`` codes or ``[B, size]`` values). A
        latent library size is the last latent unit, standardized by its prior (``Library``).
        """
        encoded = self.encoded_covariates(covariates)
        width = self.latent_dim - self.latent_library
        out = _run(self.encoder, x, encoded).reshape(x.shape[0], 2 * width)
        mean, log_var = out[:, :width], self._floored(out[:, width:])
        if self.latent_library:
            own = _run(self.library.encoder, x, encoded).reshape(x.shape[0], 2)
            prior_mean, prior_log_var = self.library.prior(covariates or {}, x.shape[0])
            mean = torch.cat([mean, (own[:, :1] - prior_mean) * torch.exp(-0.5 * prior_log_var)], dim=1)
            log_var = torch.cat([log_var, self._floored(own[:, 1:]) - prior_log_var], dim=1)
        return mean, log_var

    def encode_logits(self, x: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A discrete latent's q(z|x) logits ``[B, latent_dim]`` (``posterior_family`` categorical or bernoulli)."""
        return _run(self.encoder, x, self.encoded_covariates(covariates)).reshape(x.shape[0], self.latent_dim)

    def _floored(self, log_var: torch.Tensor) -> torch.Tensor:
        return log_var if not self.variance_floor else torch.logaddexp(log_var, torch.tensor(math.log(self.variance_floor)))

    def linear_head(self) -> tuple[nn.Module, nn.Linear] | None:
        """(everything before, the last layer) when the decoder ends in a linear layer, else None.

        None as well for a model taking covariates or a library size, whose decoder needs them.
        """
        if self.covariates or self.library is not None:
            return None
        if isinstance(self.decoder, nn.Sequential) and isinstance(self.decoder[-1], nn.Linear):
            return self.decoder[:-1], self.decoder[-1]
        return None

    def decode_through_head(self, z: torch.Tensor, trunk: nn.Module, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last linear layer's input ``[B, H]`` and output ``[B, P*D]`` (see ``linear_head``)."""
        hidden = _run(trunk, z) if len(trunk) else z
        return hidden, _run(head, hidden)

    def decode(self, z: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Likelihood parameters: ``z [N, latent_dim]`` -> ``[N, P, *input_shape]``.

        ``covariates`` are each row's own (repeat a point's for each of its samples). With a
        latent library size (the last unit of z), the first block becomes the log-mean:
        log softmax of the decoder's logits + the log library size.
        """
        encoded = self.encoded_covariates(covariates)
        params = _run(self.decoder, z[:, :-1] if self.latent_library else z, encoded).reshape(z.shape[0], *self.decode_shape)
        if not self.latent_library:
            return params
        prior_mean, prior_log_var = self.library.prior(covariates or {}, z.shape[0])
        log_library = prior_mean + torch.exp(0.5 * prior_log_var) * z[:, -1:]
        first = params[:, 0].reshape(z.shape[0], -1)
        shares = F.log_softmax(first, dim=-1) + log_library
        return torch.cat([shares.reshape(z.shape[0], 1, *self.input_shape), params[:, 1:]], dim=1)


def rows_independently(
    net: Callable[..., Any], x: torch.Tensor, encoded: Mapping[str, torch.Tensor] | None = None
) -> Any:
    """``net(x)`` (a tensor or a tuple of them), each row's result independent of how many rows came with it.

    With ``encoded`` covariates (a ``Chain``'s), ``net(x, encoded)``, padded alike.
    """
    rows, encoded = x.shape[0], encoded or None
    if rows >= MIN_ROWS:
        return net(x) if encoded is None else net(x, encoded)
    padded = torch.cat([x, x.new_zeros((MIN_ROWS - rows, *x.shape[1:]))])
    if encoded is None:
        result = net(padded)
    else:
        result = net(padded, {name: torch.cat([v, v.new_zeros((MIN_ROWS - rows, *v.shape[1:]))]) for name, v in encoded.items()})
    return tuple(part[:rows] for part in result) if isinstance(result, tuple) else result[:rows]


_run = rows_independently


@dataclass(frozen=True)
class Covariate:
    """One entry of the document's ``covariates``: categorical (with its labels, one-hot) or continuous (``size`` values)."""

    name: str
    categories: tuple[str, ...] | None = None
    size: int = 1

    @property
    def width(self) -> int:
        return len(self.categories) if self.categories is not None else self.size
