"""Where a model and its data come from: a format-1 file, or a state dict read through the user's class.

The one entry point the command line uses to turn MODEL and DATA arguments
into a loaded model and data checked against it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from vaeeval.format import reading
from vaeeval.format.data import Dataset, covariate_headers, load_data, point_shape
from vaeeval.format.lengths import read_lengths
from vaeeval.format.model import Model
from vaeeval.format.ranges import Rescaled
from vaeeval.user.arch import ArchOptions, arch_model
from vaeeval.user.format_latents import through_distributions


def model_for(
    path: str | Path, data: str | Path, arch: ArchOptions | None, *, key: str | None = None, layer: str | None = None
) -> Model:
    """The model at ``path``: a format-1 file, or with ``arch`` a state dict read through the user's class.

    An ``--arch`` model takes points shaped as in ``data``; ``arch.encode_shape`` reshapes them for ``encode``.
    """
    if arch is None:
        return load_model(path)
    shape = point_shape(data, key=key, layer=layer)
    encode_shape = arch.encode_shape if arch.encode_shape != shape else None
    covariates = covariate_headers(data, arch.covariates, key=key)
    return arch_model(path, replace(arch, encode_shape=encode_shape), shape, covariates)


def load_model(path: str | Path) -> Model:
    """The format-1 model at ``path``, ready to evaluate (a discrete latent as the general path's distributions)."""
    return through_distributions(reading.load_model(path))


def load(
    model: str | Path,
    data: str | Path,
    *,
    arch: ArchOptions | None = None,
    key: str | None = None,
    layer: str | None = None,
    limit: int | None = None,
    max_data_size: int | None = None,
    rescale: tuple[float, float] | None = None,
) -> tuple[Model, Dataset]:
    """The model (a format-1 file, or ``arch``) and its data, checked against it.

    Args:
        model: the model file (with ``arch``: the safetensors state dict).
        data: the ``.npy``, ``.npz`` or ``.h5ad`` data file.
        arch: how to read the state dict through the user's class (runs the user's code).
        key: the array to use from an ``.npz`` that holds several.
        layer: the AnnData layer of an ``.h5ad`` (default: the one the model records, else X).
        limit: use only the first ``limit`` points.
        max_data_size: refuse an ``.npz`` array that would inflate to more bytes (``load_data``).
        rescale: the values [low, high] the data's own units run over, mapped onto the model's range.

    Raises:
        VaeevalError: a model or data file that cannot be read or does not fit.
    """
    loaded = model_for(model, data, arch, key=key, layer=layer)
    found = load_data(data, loaded, key=key, layer=layer, limit=limit, max_data_size=max_data_size,
                      covariates=loaded.covariates, rescale=rescale)
    if arch is not None and arch.lengths is not None:
        lengths = read_lengths(data, arch.lengths, positions=loaded.input_shape[0], rows=found.total, key=key, limit=limit,
                               max_data_size=max_data_size)
        found = replace(found, lengths=lengths)
    return with_rescaling_note(with_calibration_note(loaded, found), found), found


def with_rescaling_note(model: Model, data: Dataset) -> Model:
    """``model``, noting that ``data`` was rescaled on reading, and what that does to a density."""
    if not isinstance(data.array, Rescaled):
        return model
    (low, high), (to_low, to_high) = data.array.source, data.array.target
    shift = model.data_dims * math.log((high - low) / (to_high - to_low))
    note = (f"data {data.array.describe()} (--rescale): bin probabilities are the same in either units; a density is the "
            f"rescaled data's, {shift:.6g} nats per point above the density of the data in its own units")
    return replace(model, notes=(*model.notes, note))


def with_calibration_note(model: Model, data: Dataset) -> Model:
    """``model``, noting when ``data`` is the very data its scale was fitted on: its numbers there are optimistic."""
    if model.calibration is None or model.calibration["data"]["digest"] != data.digest:
        return model
    note = "optimistic: this data is the data the likelihood's scale was fitted on; report numbers on other held-out data"
    return replace(model, notes=(*model.notes, note))
