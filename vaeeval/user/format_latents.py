"""Format-1 models vaeeval evaluates through torch distributions, as the ``--arch`` general path: a discrete
latent (FORMAT.md, "A discrete latent") and two latent groups (FORMAT.md, "Two latent groups").

Its encoder gives logits: q(z|x) is ``OneHotCategorical(logits)`` (``posterior.family``
categorical) or ``Independent(Bernoulli(logits), 1)`` (bernoulli), its prior the same family,
uniform or with learned logits. Held as an ``ArchModel`` of those distributions, it gets
everything a discrete ``--arch`` latent gets: keyed draws (``user/discrete.py``), the KL in
closed form, exact sums over z (``elbo --enumerate``), and ``ais``/``bdmc``'s refusal.

Two latent groups are the chains of ``user/hierarchy.py``: q(z1|x) from the encoder, q(z2|z1) and
p(z1|z2) diagonal Gaussians from the ``hierarchy`` block's layers, p(z2) the ``prior`` block; the
decoder takes z1. Every network sees its rows padded to 64 (``rows_independently``), so no number
depends on the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import torch
from torch.distributions import Bernoulli, Distribution, Independent, Normal, OneHotCategorical

from vaeeval.format.model import Model, rows_independently
from vaeeval.user.hierarchy import groups_note, plan_of, posterior_chain, prior_chain
from vaeeval.user.protocol import ArchModel, DistributionPrior, discreteness


def _posterior(family: str, logits: torch.Tensor) -> Distribution:
    if family == "categorical":
        return OneHotCategorical(logits=logits, validate_args=False)
    return Independent(Bernoulli(logits=logits, validate_args=False), 1)


def through_distributions(model: Model) -> Model:
    """``model`` as an ``ArchModel`` of its distributions where its latent is discrete or has two groups; else unchanged."""
    if model.hierarchy is not None:
        return _two_groups(model)
    family = model.posterior_family
    if family == "gaussian":
        return model
    probe = _posterior(family, torch.zeros(2, model.latent_dim))
    p_z = model.prior.distribution(torch.zeros((), dtype=torch.float64))
    prior = DistributionPrior(p_z, model.latent_dim, probe, source="format 1")
    prior.spec = dict(model.prior.spec)  # the file's prior block, as inspect and the documents show it
    kept = {f.name: getattr(model, f.name) for f in fields(Model)} | {"prior": prior, "general": True}
    return ArchModel(
        **kept,
        posterior_of=lambda x, c: _posterior(family, model.encode_logits(x, c)),
        decode_of=lambda z, c: model.decode(z, c),
        discrete_latent=discreteness(probe, p_z),
        discrete_posterior=True,
        discrete_family=family,
    )


def _gaussian(params: torch.Tensor, size: int) -> Distribution:
    """A diagonal Normal from ``[..., 2 size]``: means, then log-variances (float64, as vaeeval evaluates)."""
    params = params.double()
    return Independent(Normal(params[..., :size], (0.5 * params[..., size:]).exp(), validate_args=False), 1)


def _through(net: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """``net`` on ``rows [..., d]`` (a posterior factor's ``[*samples, B, d]``), each row as if alone in its batch."""
    flat = rows.reshape(-1, rows.shape[-1]).to(torch.float32)
    return rows_independently(net, flat).reshape(*rows.shape[:-1], -1)


def _two_groups(model: Model) -> ArchModel:
    top, bottom, size = model.hierarchy, model.latent_dim, model.hierarchy.latent_dim

    def encoded(x: torch.Tensor, covariates: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        mean, log_var = model.encode(x, covariates)
        return {"z1": _gaussian(torch.cat([mean, log_var], dim=-1), bottom),
                "z2": lambda z1: _gaussian(_through(top.encoder, z1), size)}

    probe_x = torch.zeros(2, *model.input_shape)
    plan = plan_of(encoded(probe_x, {}), "the encoder", 2)
    top_prior = model.prior.distribution(torch.zeros((), dtype=torch.float64))
    p_z = prior_chain({"z2": top_prior, "z1": lambda z2: _gaussian(_through(top.prior, z2), bottom)}, plan.layout)
    prior = DistributionPrior(p_z, bottom + size, posterior_chain(encoded(probe_x, {}), plan, "the encoder", probe_x),
                              source="format 1")
    prior.spec = dict(model.prior.spec)  # p(z2), as the file gives it
    kept = {f.name: getattr(model, f.name) for f in fields(Model)}
    kept |= {"prior": prior, "general": True, "latent_dim": bottom + size, "notes": (*model.notes, groups_note(plan, p_z))}
    return ArchModel(
        **kept,
        posterior_of=lambda x, c: posterior_chain(encoded(x, c), plan, "the encoder", x),
        decode_of=lambda z, c: model.decode(z[..., :bottom].to(torch.float32), c),
        latent_groups=plan.layout.names,
    )
