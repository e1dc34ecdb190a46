"""A count model's library size (FORMAT.md, "Library size"): observed, or a latent with its own Gaussian prior.

scVI's mean is library x softmax(decoder(z)). With ``observed`` the library is the point's
total count (the likelihood takes it from the data: the number is log p(x | library size)).
With ``latent`` it is exp(l), l ~ N(m_c, v_c) a second latent whose prior may depend on a
categorical covariate c (scVI: per batch) and whose q(l|x) comes from its own encoder.

vaeeval evaluates the latent one through the standardized unit u = (l - m_c) / sqrt(v_c):
u has the standard normal prior whatever c is, q(u|x) is q(l|x) shifted and scaled alike,
and the decoder maps u back to l. The change of variables is the same for q and p, so
log p(x), every importance weight, the ELBO and the KL (which then includes the library's
term) are exactly those of l, and the fast path's N(0, I) prior serves (z, u) whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from vaeeval.format.layers import Chain

OBSERVED, LATENT = "observed", "latent"


@dataclass(frozen=True)
class Library:
    """The library size of a count model.

    Attributes:
        kind: ``observed`` or ``latent``.
        encoder: q(l|x)'s network (latent only): ``x`` -> ``[2]``, the mean and log-variance of l.
        mean, log_var: the prior of l, ``[C]`` per category of ``covariate`` or ``[1]``.
        covariate: the categorical covariate choosing the prior's component, or None.
    """

    kind: str
    encoder: Chain | None = None
    mean: torch.Tensor | None = None
    log_var: torch.Tensor | None = None
    covariate: str | None = None

    @property
    def latent(self) -> bool:
        return self.kind == LATENT

    def prior(self, covariates: Mapping[str, torch.Tensor], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's prior mean and log-variance of l, ``[rows, 1]`` float32."""
        if self.covariate is None:
            return self.mean.expand(rows).reshape(rows, 1), self.log_var.expand(rows).reshape(rows, 1)
        codes = covariates[self.covariate].reshape(-1).long()
        return self.mean[codes].reshape(rows, 1), self.log_var[codes].reshape(rows, 1)

    def to(self, device: torch.device | str) -> Library:
        if not self.latent:
            return self
        return replace(self, encoder=self.encoder.to(device), mean=self.mean.to(device), log_var=self.log_var.to(device))

    def describe(self) -> str:
        """In words, for the output."""
        if not self.latent:
            return "observed: each point's total count, so the numbers are log p(x | library size)"
        given = f" per {self.covariate}" if self.covariate else ""
        return f"latent, with its own Gaussian prior{given}: the numbers are log p(x), the KL includes the library's term"
