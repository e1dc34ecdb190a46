"""Sequences through ``--arch``: a teacher-forced decoder, and padding that does not count.

A sentence VAE's decoder is autoregressive: p(x|z) = prod_t p(x_t | x_<t, z), computed in
one pass by feeding it the sequence itself (teacher forcing). vaeeval passes the data to
``decode`` when it has a parameter named ``x`` (``decode(z, x)``), the rows of ``x`` aligned
with the rows of ``z`` (every z row is a draw for one data point). With ``--lengths``,
positions at or past a sequence's length are padding: vaeeval drops their terms from
log p(x|z) (``masked_log_prob``), and passes ``lengths`` ``[N]`` (int64) and ``mask``
``[N, T]`` (bool) to ``encode`` and ``decode`` where they have parameters of those names,
so a GRU can pack its input.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributions import Distribution, Independent

from vaeeval.core import numerics
from vaeeval.errors import VaeevalError, option
from vaeeval.format.domains import Grid
from vaeeval.user.distributions import _log_bin, _log_prob_of_part, describe

LENGTHS = "lengths"  # the key the data's lengths travel under among the covariates (``Dataset.covariates_of``)
MASK = "mask"
DATA = "x"  # the parameter of ``decode`` that receives the data (teacher forcing)


def takes(method: Callable[..., Any], name: str) -> bool:
    """``method`` has a parameter called ``name`` (a ``**kwargs`` does not count: vaeeval passes nothing unasked)."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    found = parameters.get(name)
    return found is not None and found.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def needs_lengths(method: Callable[..., Any]) -> str | None:
    """``lengths`` or ``mask`` when ``method`` requires one (no default), which only ``--lengths`` gives; else None."""
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return None
    for name in (LENGTHS, MASK):
        found = parameters.get(name)
        if found is not None and found.default is inspect.Parameter.empty and found.kind != inspect.Parameter.VAR_KEYWORD:
            return name
    return None


def arguments(method: Callable[..., Any], covariates: Mapping[str, torch.Tensor], positions: int | None) -> dict[str, torch.Tensor]:
    """The keyword arguments ``method`` gets: the covariates, with the lengths (``positions`` given: from
    ``--lengths``) as ``lengths`` and ``mask`` only where ``method`` takes them, and ``x`` only where it takes it."""
    found = {name: value for name, value in covariates.items() if positions is None or name != LENGTHS}
    if DATA in found and not takes(method, DATA):
        del found[DATA]
    lengths = covariates.get(LENGTHS) if positions is not None else None
    if lengths is not None:
        if takes(method, LENGTHS):
            found[LENGTHS] = lengths
        if takes(method, MASK):
            found[MASK] = torch.arange(positions, device=lengths.device) < lengths[:, None]
    return found


def per_position(distribution: Distribution, rows: int, positions: int) -> Distribution | None:
    """The distribution whose ``log_prob`` has one term per position (batch shape ``[rows, positions, ...]``),
    under its ``Independent`` wrappers; None when its numbers cannot be split by position."""
    while isinstance(distribution, Independent):
        distribution = distribution.base_dist
    batch = tuple(distribution.batch_shape)
    return distribution if len(batch) >= 2 and batch[:2] == (rows, positions) else None


def check_maskable(distribution: Distribution, rows: int, positions: int, method: str, masks_itself: bool) -> None:
    """With ``--lengths``: ``decode``'s distribution can be masked per position, or ``decode`` masks it itself.

    Raises:
        VaeevalError: neither.
    """
    if masks_itself or per_position(distribution, rows, positions) is not None:
        return
    raise VaeevalError(
        f"{option('lengths')}: {method}(z) returned {describe(distribution)} with batch shape "
        f"{list(distribution.batch_shape)} for {rows} sequences of {positions} positions, whose log_prob cannot be split "
        f"by position; return one with batch shape [N, {positions}, ...] (Independent(Categorical(logits=[N, {positions}, V]), 1)), "
        f"or take lengths or mask in {method} and leave padding out of log_prob yourself"
    )


def masked_log_prob(distribution: Distribution, x: torch.Tensor, lengths: torch.Tensor, bins: Grid | None) -> torch.Tensor | None:
    """log p(x|z) ``[N]`` float64 over the first ``lengths[i]`` positions of each row; None when the
    distribution's terms cannot be split by position (``per_position``).

    Args:
        distribution: p(x|z) for N rows, batch shape ``[N, T, ...]`` under any ``Independent``.
        x: ``[N, T, ...]`` the rows' data.
        lengths: ``[N]`` the rows' lengths, 1 <= length <= T.
        bins: score a continuous distribution on this grid (as ``log_prob_of``).

    Each position's terms are summed, then the positions before the length, both by fixed
    trees (``numerics.tree_sum``), so a row's number depends on neither the batch nor its padding.
    """
    rows, positions = x.shape[0], x.shape[1]
    base = per_position(distribution, rows, positions)
    if base is None:
        return None
    shape = (*base.batch_shape, *base.event_shape)
    if math.prod(shape) != math.prod(x.shape):
        raise ValueError(f"is a distribution of shape {list(shape)} for data of shape {list(x.shape)}")
    values = x.reshape(shape)
    if bins is not None and not base.support.is_discrete:
        terms = _log_bin(base, values, bins)
    else:
        terms = _log_prob_of_part(base, values)
    each = numerics.tree_sum(terms.double().reshape(rows, positions, -1))  # [N, T]
    inside = torch.arange(positions, device=each.device) < lengths.to(each.device)[:, None]
    return numerics.tree_sum(torch.where(inside, each, torch.zeros_like(each)))
