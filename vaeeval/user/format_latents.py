"""A format-1 model with a discrete latent (FORMAT.md, "A discrete latent"), evaluated as the ``--arch`` general path.

Its encoder gives logits: q(z|x) is ``OneHotCategorical(logits)`` (``posterior.family``
categorical) or ``Independent(Bernoulli(logits), 1)`` (bernoulli), its prior the same family,
uniform or with learned logits. Held as an ``ArchModel`` of those distributions, it gets
everything a discrete ``--arch`` latent gets: keyed draws (``user/discrete.py``), the KL in
closed form, exact sums over z (``elbo --enumerate``), and ``ais``/``bdmc``'s refusal.
"""

from __future__ import annotations

from dataclasses import fields

import torch
from torch.distributions import Bernoulli, Distribution, Independent, OneHotCategorical

from vaeeval.format.model import Model
from vaeeval.user.protocol import ArchModel, DistributionPrior, discreteness


def _posterior(family: str, logits: torch.Tensor) -> Distribution:
    if family == "categorical":
        return OneHotCategorical(logits=logits, validate_args=False)
    return Independent(Bernoulli(logits=logits, validate_args=False), 1)


def with_discrete_latent(model: Model) -> Model:
    """``model`` as an ``ArchModel`` of its distributions where its latent is discrete; unchanged otherwise."""
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
