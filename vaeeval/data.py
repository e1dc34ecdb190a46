"""Data: read ``.npy``/``.npz`` without unpickling, and check it against a model.

Every check runs over the whole selected data before anything is computed:
shape, finiteness, the likelihood's support and the model's declared domain.
A failure names the point, the element and the value found, and what was needed.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vaeeval.domains import Domain, DomainDetector, row_blocks
from vaeeval.errors import DataError, option
from vaeeval.files import reading

if TYPE_CHECKING:
    from vaeeval.model import Model

_NUMERIC_KINDS = "biuf"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Dataset:
    """Data points ready to evaluate: ``array`` is ``[N, *input_shape]`` (possibly memory-mapped).

    ``domain`` is what the values are, as detected: the smallest of binary,
    discrete (on some k/(L-1) grid), unit_interval and real that holds them all.
    """

    array: np.ndarray
    path: Path | None = None
    key: str | None = None
    total: int = 0  # points in the file, before a limit
    domain: Domain = Domain("real")

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def dims(self) -> int:
        return math.prod(self.array.shape[1:])

    @cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` of the points as evaluated (see ``data_digest``), computed once."""
        return data_digest(self.array)


def load_data(path: str | Path, model: Model, *, key: str | None = None, limit: int | None = None) -> Dataset:
    """Read a ``.npy`` (memory-mapped) or ``.npz`` file and check it against ``model``.

    Args:
        path: the data file; ``[N, *input_shape]``, or ``[N, D]`` for any input shape with D elements.
        model: the model the data is for.
        key: the array to use from an ``.npz`` that holds several.
        limit: use only the first ``limit`` points.

    Raises:
        DataError: unreadable, not numeric, wrong shape, non-finite values, or values
            outside the likelihood's support or the model's declared domain.
    """
    path = Path(path)
    raw = _read_array(path, key)
    array = _shaped(path, raw, model.input_shape)
    total = int(array.shape[0])
    if limit is not None:
        array = array[:limit]
    domain = check_values(Dataset(array, path, key, total), model)
    return Dataset(array, path, key, total, domain)


def data_digest(array: np.ndarray) -> str:
    """``sha256:<hex>`` of the points as evaluated: their dtype, shape and values, block by block."""
    digest = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}".encode())
    for _, block in row_blocks(array):
        digest.update(np.ascontiguousarray(block).tobytes())
    return f"sha256:{digest.hexdigest()}"


def point_shape(path: str | Path, *, key: str | None = None) -> tuple[int, ...]:
    """The shape of one point of a data file (everything after N), read without loading it.

    Raises:
        DataError: unreadable, not numeric, or fewer than two axes.
    """
    array = _read_array(Path(path), key)
    if array.ndim < 2:
        raise DataError(path, f"data has shape {list(array.shape)}; it needs [N, ...], one row per point")
    return tuple(array.shape[1:])


def _read_array(path: Path, key: str | None) -> np.ndarray:
    with reading(path, DataError, "data file"), path.open("rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x80"):
        raise DataError(path, "a Python pickle; vaeeval never unpickles files — save the array with numpy.save")
    if key is not None and not magic.startswith(b"PK"):
        raise DataError(path, f"{option('key')} selects an array of an .npz file, and this is not one")
    try:
        if magic == b"\x93NUMPY":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif magic.startswith(b"PK"):
            array = _from_npz(path, key)
        else:
            raise DataError(path, "not a .npy or .npz file")
    except ValueError as error:
        text = str(error)
        if "allow_pickle" in text or "Python objects" in text or "object" in text.lower():
            raise DataError(
                path, "holds Python objects (dtype object); vaeeval reads numeric arrays and never unpickles"
            ) from None
        raise DataError(path, f"truncated or corrupt ({text.splitlines()[0]})") from None
    except (OSError, EOFError) as error:
        raise DataError(path, f"truncated or corrupt ({error})") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(path, f"holds {array.dtype} values; vaeeval needs a numeric (bool, integer or float) array")
    return array


def _from_npz(path: Path, key: str | None) -> np.ndarray:
    with path.open("rb") as handle:  # our handle, closed even when the archive is corrupt
        try:
            archive = np.load(handle, allow_pickle=False)
        except zipfile.BadZipFile as error:
            raise DataError(path, f"truncated or corrupt .npz ({error})") from None
        return _npz_member(path, archive, key)


def _npz_member(path: Path, archive: np.lib.npyio.NpzFile, key: str | None) -> np.ndarray:
    with archive:
        names = list(archive.files)
        if not names:
            raise DataError(path, "an .npz file with no arrays")
        if key is None:
            if len(names) > 1:
                raise DataError(path, f"holds several arrays ({', '.join(names)}); choose one with {option('key')}")
            key = names[0]
        if key not in names:
            raise DataError(path, f"has no array {key!r}; it holds {', '.join(names)}")
        return archive[key]


def _shaped(path: Path, array: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    dims = math.prod(input_shape)
    if array.shape[1:] == input_shape:
        shaped = array
    elif array.ndim == 2 and array.shape[1] == dims:
        shaped = array.reshape(array.shape[0], *input_shape)
    else:
        wanted = f"[N, {', '.join(map(str, input_shape))}]"
        alternative = f" or [N, {dims}]" if len(input_shape) > 1 else ""
        raise DataError(path, f"data has shape {list(array.shape)}; the model needs {wanted}{alternative}")
    if shaped.shape[0] == 0:
        raise DataError(path, "holds no data points")
    return shaped


def _first_bad(start: int, block: np.ndarray, mask: np.ndarray) -> str:
    index = np.argwhere(mask)[0]
    point, element = start + int(index[0]), [int(i) for i in index[1:]]
    value = block[tuple(index)]
    return f"point {point}, element {element} is {float(value):.6g}"


def check_values(dataset: Dataset, model: Model) -> Domain:
    """Refuse non-finite values and values the model cannot score; detect the data's domain.

    Returns:
        The detected domain of the values.

    Raises:
        DataError: naming the first bad point and element, the value, and what was needed.
    """
    likelihood, domain = model.likelihood, model.domain
    detector = DomainDetector()
    for start, block in row_blocks(dataset.array):
        detector.update(block)
        if block.dtype.kind == "f":
            bad = ~np.isfinite(block)
            if bad.any():
                raise DataError(dataset.path, f"{_first_bad(start, block, bad)}; data must be finite")
            if block.dtype.itemsize > 4:
                bad = np.abs(block) > _FLOAT32_MAX
                if bad.any():
                    raise DataError(
                        dataset.path, f"{_first_bad(start, block, bad)}, beyond the float32 range vaeeval computes in"
                    )
        bad = likelihood.outside_support(block)
        if bad.any():
            raise DataError(
                dataset.path,
                f"{_first_bad(start, block, bad)}; the {likelihood.family} likelihood needs {likelihood.support}",
            )
        if domain is not None:
            bad = domain.outside(block)
            if bad.any():
                raise DataError(
                    dataset.path,
                    f"{_first_bad(start, block, bad)}; the model declares {domain.describe()}",
                )
    return detector.domain()
