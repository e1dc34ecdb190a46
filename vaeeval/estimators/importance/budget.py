"""Memory budgets: how many points per encoder pass and samples per decoder call fit in ``--max-memory``."""

from __future__ import annotations

import math

from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.weights import BLOCK
from vaeeval.format.model import Model


def row_bytes(model: Model) -> int:
    """Rough working memory of one (point, sample) row through the decoder and likelihood."""
    widest = max(model.decoder_width, model.likelihood.params_per_dim * model.data_dims)
    dims = model.data_dims
    return 4 * (2 * widest + (model.likelihood.params_per_dim + 4) * dims) + 8 * (2 * dims + 8 * model.latent_dim)


# Rows (points x samples) per decoder call: large enough for efficient matrix products,
# small enough that the elementwise passes after them run from cache (measured on the
# MNIST-size benchmark: 2-3k rows are fastest, 13k rows 25% slower).
TARGET_ROWS = 3072


def batch_within(model: Model, batch_size: int, rows_per_point: int, max_memory: int) -> int:
    """The batch size, made smaller where ``rows_per_point`` rows of each point would not fit in ``max_memory``.

    Raises:
        VaeevalError: not even one point's rows fit; the message says how much they need.
    """
    needed = rows_per_point * row_bytes(model)
    if max_memory < needed:
        raise VaeevalError(
            f"{option('max_memory')} {max_memory:,} bytes is less than one chunk of {rows_per_point} sample(s) of one "
            f"point needs ({needed:,} bytes through this decoder); give at least {_size(needed)}"
        )
    return min(batch_size, max_memory // needed)


def _size(count: int) -> str:
    """``count`` bytes rounded up to a size the command line reads (``3M``)."""
    for suffix, factor in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if count >= factor:
            return f"{math.ceil(count / factor)}{suffix}"
    return str(count)


def chunk_size_for(model: Model, batch_size: int, samples: int, max_memory: int) -> int:
    """Samples per chunk: whole blocks, about ``TARGET_ROWS`` rows, within ``max_memory``; at least one block."""
    fitting = max_memory // (row_bytes(model) * batch_size)
    wanted = max(TARGET_ROWS // batch_size, 1)
    blocks = max(1, min(fitting // BLOCK, wanted // BLOCK, math.ceil(samples / BLOCK)))
    return blocks * BLOCK
