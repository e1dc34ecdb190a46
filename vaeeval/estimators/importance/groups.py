"""Latent health per group of a hierarchical latent: each group's KL, from a second pass over the evaluation's draws.

For the groups g of a hierarchical latent (``user/hierarchy.py``), log q(z|x) − log p(z) is
Σ_g (log q_g − log p_g), so the chain's KL splits exactly into per-group terms:

    KL_g(x) = E_q[log q_g(z_g | z_<g, x) − log p_g(z_g | its parents)]

Each is estimated from the evaluation's own K keyed draws (``keyed_sample``, keyed by
(seed, point, k), rounded to float32 as ``evaluate`` rounds them), with its Monte Carlo
standard error, in the first of these ways that applies:

* ``analytic``: both of the group's factors condition on nothing (no callable) and torch has
  their KL in closed form (``analytic_kl``): that closed form, exact.
* ``analytic_given_draws``: p's factor conditions only on groups q draws before this one, and
  torch has the pair's KL in closed form: E_q[KL(q_g(. | z_<g, x) || p_g(. | parents))], the
  closed form at each draw of the earlier groups averaged over the draws (Rao-Blackwellized:
  no noise from z_g itself). p's factor then takes q's draws as ``[S, B, d]``.
* ``monte_carlo``: the mean of log q_g − log p_g over the draws.

Sampled ones add up to the evaluation's Monte Carlo KL exactly; the others to its expectation. As
``explain`` does, this redraws rather than widening the evaluation loop and its results files;
it calls no decoder. The sums over samples run in fixed blocks (``Moments``), so the numbers
do not depend on the batch or chunk size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import Distribution

from vaeeval.estimators.importance.evaluate import Evaluator
from vaeeval.estimators.weights import Moments
from vaeeval.format.terms import ANALYTIC, GIVEN_DRAWS, MONTE_CARLO
from vaeeval.user.distributions import analytic_kl, flows, keyed_sample
from vaeeval.user.hierarchy import LatentChain


@dataclass(frozen=True)
class GroupKL:
    """Per group (in the flat z's order): its columns, and per point its KL and the KL's Monte Carlo standard error.

    ``kl`` is None where p(z) is one distribution over the flat z (a ``prior()`` that is not a
    mapping of groups), which does not split by group.
    """

    names: tuple[str, ...]
    units: tuple[tuple[int, int], ...]
    kl: dict[str, np.ndarray] | None
    kl_stderr: dict[str, np.ndarray] | None
    kinds: dict[str, str] | None


def group_kl(evaluator: Evaluator, progress: Callable[[int], None] | None = None) -> GroupKL | None:
    """Each group's KL for every point of ``evaluator``'s data, in index order; None for a latent without groups."""
    model, settings = evaluator.model, evaluator.settings
    if not getattr(model, "latent_groups", ()):
        return None
    indices = np.arange(evaluator.n)
    found: dict[str, list[np.ndarray]] = {}
    errors: dict[str, list[np.ndarray]] = {}
    kinds: dict[str, str] = {}
    names: tuple[str, ...] = ()
    with torch.inference_mode():
        for start in range(0, indices.size, settings.batch_size):
            rows = indices[start : start + settings.batch_size]
            x, covariates = evaluator.batch(rows)
            q = model.posterior(x, covariates)
            if not isinstance(q, LatentChain):
                return None
            layout, prior = q.plan.layout, model.prior.distribution(x)
            names = layout.names
            if not isinstance(prior, LatentChain):
                break
            closed = {name: _closed_form(q, prior, name, rows.size) for name in names}
            given = {name for name in names if closed[name] is None and _parents_drawn(q, prior, name)}
            sampled = {name: Moments() for name in names if closed[name] is None}
            for first in range(0, settings.samples, settings.chunk_size):
                z = keyed_sample(q, settings.seed, rows, first, min(settings.samples, first + settings.chunk_size))
                if not flows(q) and z.dtype == torch.float64:
                    z = z.to(torch.float32).double()  # the point evaluate's densities see
                per_draw = _given_draws(q, prior, given, z)
                given -= {name for name, kl in per_draw.items() if kl is None}  # no closed form: sampled
                log_q, log_p = (q.group_log_probs(z), prior.group_log_probs(z)) if set(sampled) - given else ({}, {})
                for name, moments in sampled.items():
                    moments.update((per_draw[name] if name in given else log_q[name] - log_p[name]).T.contiguous())
            for name in names:
                if closed[name] is None:
                    kl, error = sampled[name].mean(settings.samples), sampled[name].stderr(settings.samples)
                else:
                    kl, error = closed[name], torch.zeros_like(closed[name])
                kinds.setdefault(name, ANALYTIC if closed[name] is not None else GIVEN_DRAWS if name in given else MONTE_CARLO)
                found.setdefault(name, []).append(kl.cpu().numpy())
                errors.setdefault(name, []).append(error.cpu().numpy())
            if progress is not None:
                progress(start + rows.size)
    slices = layout.slices()
    units = tuple((slices[name].start, slices[name].stop) for name in names)
    if not found:
        return GroupKL(names, units, None, None, None)
    return GroupKL(names, units, {k: np.concatenate(v) for k, v in found.items()},
                   {k: np.concatenate(v) for k, v in errors.items()}, kinds)


def _closed_form(posterior: LatentChain, prior: LatentChain, name: str, rows: int) -> torch.Tensor | None:
    """KL of group ``name``'s two factors where both condition on nothing, per point ``[rows]``, where torch has
    it in closed form; else None."""
    if not isinstance(posterior.factors[name], Distribution) or not isinstance(prior.factors[name], Distribution):
        return None
    kl = analytic_kl(posterior.factor_at(name, {}), prior.factor_at(name, {}))  # the batch of q's padded rows
    if kl is None:
        return None
    return kl.double().expand(rows) if kl.dim() == 0 else kl.double()[:rows]


def _parents_drawn(posterior: LatentChain, prior: LatentChain, name: str) -> bool:
    """p's factor of group ``name`` conditions only on groups q draws before it (so q's draws give them)."""
    order = posterior.plan.order
    return set(prior.plan.arguments[name]) <= set(order[: order.index(name)])


def _given_draws(posterior: LatentChain, prior: LatentChain, names: set[str], z: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """KL(q_g(. | z_<g, x) || p_g(. | z's parents)) in closed form at each draw ``z [S, B, L]``, ``[S, B]``, for the
    groups ``names``; None for a group whose pair torch has no closed form for.

    Both factors are read at q's padded rows (``LatentChain.rows_in``): p's take them as ``[S, B, d]``.
    """
    if not names:
        return {}
    padded, back = posterior.rows_in(z.double())
    groups = posterior.plan.layout.split(padded)
    found = {}
    for name in names:
        q_g, p_g = posterior.factor_at(name, groups), prior.factor_at(name, groups)
        kl = analytic_kl(q_g, p_g) if tuple(q_g.batch_shape) == tuple(padded.shape[:-1]) else None
        found[name] = None if kl is None else back(kl.double())
    return found
