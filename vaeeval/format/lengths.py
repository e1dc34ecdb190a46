"""``--lengths``: which positions of padded sequences count, read and checked before anything is computed.

The lengths come from an array of the ``.npz`` DATA (``--lengths lengths``) or from a
``.npy`` file of their own (``--lengths lengths.npy``): ``[N]`` integers, each from 1 to T
(the positions of a data point, its first axis), or a mask ``[N, T]`` of 0 and 1 whose ones
are a prefix of each row. Either becomes ``[N]`` int64 lengths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vaeeval.errors import DataError, option
from vaeeval.format.data import _read_array, default_max_data_size


def read_lengths(data: str | Path, spec: str, *, positions: int, rows: int, key: str | None = None,
                 limit: int | None = None, max_data_size: int | None = None) -> np.ndarray:
    """The first ``limit`` sequences' lengths, int64 ``[n]``, checked against data of ``rows`` points of ``positions``.

    Args:
        data: the data file (an ``.npz`` holding the array ``spec``, unless ``spec`` is a ``.npy`` file).
        spec: an array of the ``.npz`` DATA, or a path ending in ``.npy``.
        positions: T, the length of the data's first axis after N.
        rows: N, the points the data file holds.
        key: the data's own array (``--key``), which cannot be the lengths.
        limit: keep the first ``limit``.

    Raises:
        DataError: naming ``--lengths``, the first bad sequence and its value.
    """
    max_bytes = default_max_data_size() if max_data_size is None else max_data_size
    separate = spec.endswith(".npy")
    path = Path(spec) if separate else Path(data)
    if not separate:
        if spec == key:
            raise DataError(path, f"{option('lengths')} {spec}: is the data array itself ({option('key')})")
        with path.open("rb") as handle:
            if not handle.read(2).startswith(b"PK"):
                raise DataError(path, f"{option('lengths')} {spec}: names an array of an .npz DATA, and this is not one "
                                      "(or give a .npy file of lengths)")
    values = np.asarray(_read_array(path, None if separate else spec, None, max_bytes).array)
    where = f"{option('lengths')} {spec}"
    if values.ndim not in (1, 2) or values.ndim == 2 and values.shape[1] != positions:
        raise DataError(path, f"{where}: is {list(values.shape)}; it needs [N] lengths or an [N, {positions}] mask")
    if values.shape[0] != rows:
        raise DataError(path, f"{where}: holds {values.shape[0]} sequences; the data holds {rows}")
    if values.dtype.kind == "f":
        bad = np.flatnonzero(~(np.isfinite(values) & (values == np.round(values))).reshape(rows, -1).all(1))
        if bad.size:
            row = values[bad[0]]
            shown = row if row.ndim == 0 else row[~(np.isfinite(row) & (row == np.round(row)))][0]
            raise DataError(path, f"{where}: sequence {int(bad[0])} has {float(shown):.6g}; lengths are whole numbers")
    lengths = _from_mask(path, where, values, positions) if values.ndim == 2 else values.astype(np.int64)
    bad = np.flatnonzero((lengths < 1) | (lengths > positions))
    if bad.size:
        raise DataError(path, f"{where}: sequence {int(bad[0])} has length {int(lengths[bad[0]])}; each must be from 1 to "
                              f"{positions}, the positions of a data point")
    return lengths[:limit]


def _from_mask(path: Path, where: str, mask: np.ndarray, positions: int) -> np.ndarray:
    """The lengths of a 0/1 mask whose ones are a prefix of each row."""
    bad = np.flatnonzero(~((mask == 0) | (mask == 1)).all(1))
    if bad.size:
        raise DataError(path, f"{where}: the mask of sequence {int(bad[0])} holds values other than 0 and 1")
    lengths = (mask != 0).sum(1).astype(np.int64)
    prefix = np.arange(positions) < lengths[:, None]
    bad = np.flatnonzero((prefix != (mask != 0)).any(1))
    if bad.size:
        raise DataError(path, f"{where}: the mask of sequence {int(bad[0])} is not ones then zeros; vaeeval counts "
                              "the positions before a sequence's length")
    return lengths
