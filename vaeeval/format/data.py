"""Data: read ``.npy``/``.npz``, AnnData ``.h5ad`` and the forms of ``io.readers`` without unpickling; check them against a model.

Every check runs over the whole selected data before anything is computed:
shape, finiteness, the likelihood's support and the model's declared domain.
A failure names the point, the element and the value found, and what was needed.
"""

from __future__ import annotations

import hashlib
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from vaeeval.errors import DataError, listing, option
from vaeeval.format import ranges
from vaeeval.format.domains import Domain, DomainDetector, row_blocks
from vaeeval.format.ranges import Rescaled
from vaeeval.io.files import reading, regular_file
from vaeeval.io.h5ad import Rows, is_hdf5, read_matrix, read_obs
from vaeeval.io.readers import is_torch_zip, read_folder, read_other, torch_file

if TYPE_CHECKING:
    import torch

    from vaeeval.format.model import Model

_NUMERIC_KINDS = "biuf"
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Dataset:
    """Data points ready to evaluate: ``array`` is ``[N, *input_shape]`` (possibly memory-mapped).

    From an ``.h5ad`` file ``array`` is ``Rows``, read a block of rows at a time: index it
    by a slice or by rows (``array[start:stop]``, ``array[rows]``) for dense points.
    ``domain`` is what the values are, as detected: the smallest of binary,
    discrete (on some k/(L-1) grid), unit_interval and real that holds them all.
    """

    array: np.ndarray | Rows | Rescaled
    path: Path | None = None
    key: str | None = None
    total: int = 0  # points in the file, before a limit
    domain: Domain = Domain("real")
    covariates: Mapping[str, np.ndarray] = field(default_factory=dict)  # per point, by name, for a conditional model
    layer: str | None = None  # the AnnData layer the points are from (an .h5ad file); None: X, or not an .h5ad
    lengths: np.ndarray | None = None  # [N] int64: the positions that count of each padded sequence (``--lengths``)

    def covariates_of(self, rows: np.ndarray, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """These points' covariates as the model takes them (``covariate_dtype``); their ``lengths`` too, if any."""
        import torch

        found = {**self.covariates, **({} if self.lengths is None else {"lengths": self.lengths})}
        return {
            name: torch.from_numpy(np.array(values[rows])).to(device=device, dtype=covariate_dtype(values.dtype))
            for name, values in found.items()
        }

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def dims(self) -> int:
        return math.prod(self.array.shape[1:])

    @cached_property
    def digest(self) -> str:
        """``sha256:<hex>`` of the points as evaluated (see ``data_digest``) and their covariates, computed once."""
        if not self.covariates and self.lengths is None:
            return data_digest(self.array)
        parts = [data_digest(self.array), *(f"{name}={data_digest(values)}" for name, values in sorted(self.covariates.items()))]
        if self.lengths is not None:
            parts.append(f"--lengths={data_digest(self.lengths)}")
        return f"sha256:{hashlib.sha256(' '.join(parts).encode()).hexdigest()}"


def load_data(
    path: str | Path,
    model: Model,
    *,
    key: str | None = None,
    layer: str | None = None,
    limit: int | None = None,
    max_data_size: int | None = None,
    covariates: Sequence[str] = (),
    rescale: tuple[float, float] | None = None,
) -> Dataset:
    """Read a ``.npy`` (memory-mapped), ``.npz`` or AnnData ``.h5ad`` file and check it against ``model``.

    An ``.h5ad`` (recognized by its HDF5 signature, not its name) gives the rows of X or of
    a layer, dense or sparse, read a block of rows at a time and never made dense whole;
    its covariates are ``obs`` columns (``read_covariates``).

    Args:
        path: the data file; ``[N, *input_shape]``, or ``[N, D]`` for any input shape with D elements.
        model: the model the data is for.
        key: the array to use from an ``.npz`` that holds several.
        layer: the layer of an ``.h5ad`` holding the points (``"X"``: X); default: the one the
            model records (``model.data_layer``), else X.
        limit: use only the first ``limit`` points (an ``.npz`` member is inflated only that far).
        max_data_size: refuse an ``.npz`` array that would inflate to more bytes than this, or an
            ``.h5ad`` CSC matrix that would take more to read (default ``default_max_data_size()``,
            half the machine's memory).
        covariates: names of ``.npz`` arrays holding each point's covariates (``[N, ...]``), or of
            an ``.h5ad``'s ``obs`` columns.
        rescale: the values [low, high] the data's own units run over, mapped linearly onto the
            range the model expects (``Model.expected_range``, else [0, 1]) as each batch is read.

    Raises:
        DataError: unreadable, not numeric, wrong shape, non-finite values, or values
            outside the likelihood's support or the model's declared domain; a missing or
            misshapen covariate; ``key`` with an ``.h5ad``, ``layer`` with anything else, a
            missing layer; anndata not installed for an ``.h5ad``.
    """
    path = Path(path)
    max_bytes = default_max_data_size() if max_data_size is None else max_data_size
    raw = _read_array(path, key, limit, max_bytes, layer=layer, recorded_layer=model.data_layer)
    array = _shaped(path, raw.array, model.input_shape)
    if limit is not None:
        array = array.head(limit) if isinstance(array, Rows) else array[:limit]
    chosen = array.layer if isinstance(array, Rows) else None
    if rescale is not None:
        target = model.expected_range
        array = Rescaled(array, rescale, (0.0, 1.0) if target is None else target[:2])
    domain = check_values(Dataset(array, path, key, raw.rows, layer=chosen), model)
    found = read_covariates(path, covariates, key=key, limit=limit, max_data_size=max_bytes, categories=model.categories)
    check_covariates(path, found, model)
    return Dataset(array, path, key, raw.rows, domain, found, chosen)


def check_covariates(path: str | Path | None, found: Mapping[str, np.ndarray], model: Model) -> None:
    """A format-1 model's covariates as it declares them: a categorical one integer codes into its categories,
    a continuous one ``size`` numbers per point.

    Raises:
        DataError: naming the covariate, and the first bad point and value.
    """
    for name, labels in model.categories.items():
        values = found.get(name)
        if values is None:
            continue
        if values.dtype.kind not in "iu" or values.ndim != 1:
            raise DataError(path, f"covariate {name!r} is {values.dtype} {list(values.shape)}; the model needs one integer code "
                            f"per point into its categories ({listing(list(labels))})")
        bad = np.flatnonzero((values < 0) | (values >= len(labels)))
        if bad.size:
            raise DataError(path, f"covariate {name!r}: point {int(bad[0])} has code {int(values[bad[0]])}; the model knows "
                            f"{len(labels)} categories (codes 0 to {len(labels) - 1}: {listing(list(labels))})")
    for name, size in model.covariate_sizes.items():
        values = found.get(name)
        if values is not None and math.prod(values.shape[1:]) != size:
            raise DataError(path, f"covariate {name!r} has {math.prod(values.shape[1:])} value(s) per point; the model takes {size}")


def read_covariates(
    path: str | Path,
    names: Sequence[str],
    *,
    key: str | None = None,
    limit: int | None = None,
    max_data_size: int | None = None,
    categories: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, np.ndarray]:
    """The ``.npz`` arrays ``names``, one row per data point (the first ``limit``), checked finite.

    From an ``.h5ad`` they are ``obs`` columns (``h5ad.read_obs``): a categorical or string
    column becomes int64 codes, the position of each label in ``categories[name]`` (the
    model's labels, ``Model.categories``) when given, else in the column's own categories.

    Raises:
        DataError: DATA is not an ``.npz`` or ``.h5ad``, a name it does not hold, a scalar, rows
            that are not the data's, a non-finite or missing value, a label the model does not know.
    """
    path = Path(path)
    if not names:
        return {}
    if _is_h5ad(path):
        if key is not None:
            raise _key_with_h5ad(path)
        return read_obs(path, names, limit=limit, categories=categories)
    max_bytes = default_max_data_size() if max_data_size is None else max_data_size
    rows = _read_array(path, key, 0, max_bytes).rows
    return {name: _covariate(path, name, key, limit, max_bytes, rows)[:limit] for name in names}


def covariate_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype a covariate reaches the model in: integers (labels) as int64, flags as bool, else float32."""
    import torch

    kind = np.dtype(dtype).kind
    return torch.int64 if kind in "iu" else torch.bool if kind == "b" else torch.float32


def covariate_headers(
    path: str | Path, names: Sequence[str], *, key: str | None = None, max_data_size: int | None = None
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each covariate's shape per point and dtype (``read_covariates`` checks every value first).

    Raises:
        DataError: as ``read_covariates``.
    """
    found = read_covariates(path, names, key=key, max_data_size=max_data_size)
    return {name: (tuple(values.shape[1:]), values.dtype) for name, values in found.items()}


def _covariate(path: Path, name: str, key: str | None, limit: int | None, max_bytes: int, rows: int | None) -> np.ndarray:
    """The ``.npz`` array ``name``: one value (or array) per point, finite."""
    if name == key:
        raise DataError(path, f"{option('covariates')} {name}: is the data array itself ({option('key')})")
    with reading(path, DataError, "data file"), path.open("rb") as handle:
        if not handle.read(2).startswith(b"PK"):
            raise DataError(path, f"{option('covariates')} are read from an .npz file's arrays or an .h5ad file's obs, and this is neither")
    read = _read_array(path, name, limit, max_bytes)
    if not read.shape:
        raise DataError(path, f"covariate {name!r} is a scalar; it needs one value per point, [N] or [N, ...]")
    if rows is not None and read.rows != rows:
        raise DataError(path, f"covariate {name!r} has {read.rows} rows; the data has {rows} points")
    values = read.array
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            first = tuple(np.argwhere(bad)[0])
            raise DataError(path, f"covariate {name!r} of point {first[0]} is {values[first]}; covariates must be finite")
    return values


def default_max_data_size() -> int:
    """Half the machine's physical memory (1 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def data_digest(array: np.ndarray) -> str:
    """``sha256:<hex>`` of the points as evaluated: their dtype, shape and values, block by block."""
    digest = hashlib.sha256(f"{array.dtype.str}{list(array.shape)}".encode())
    for _, block in row_blocks(array):
        digest.update(np.ascontiguousarray(block).tobytes())
    return f"sha256:{digest.hexdigest()}"


def point_shape(path: str | Path, *, key: str | None = None, layer: str | None = None) -> tuple[int, ...]:
    """The shape of one point of a data file (everything after N), read from its header alone.

    Args:
        path: the data file.
        key: the array of an ``.npz`` that holds several.
        layer: the layer of an ``.h5ad`` (default X).

    Raises:
        DataError: unreadable, not numeric, or fewer than two axes.
    """
    shape = _read_array(Path(path), key, 0, default_max_data_size(), layer=layer).shape
    if len(shape) < 2:
        raise DataError(path, f"data has shape {list(shape)}; it needs [N, ...], one row per point")
    return tuple(shape[1:])


@dataclass(frozen=True)
class _Read:
    """An array as read: its first rows (all, or those asked for), the rows the file declares, its full shape."""

    array: np.ndarray | Rows
    rows: int
    shape: tuple[int, ...]


def _read_array(
    path: Path, key: str | None, limit: int | None, max_bytes: int, *, layer: str | None = None, recorded_layer: str | None = None
) -> _Read:
    """The array of a data file by its first bytes: ``.npy``, ``.npz`` or ``.h5ad`` (``layer``, else ``recorded_layer``, else X);
    a folder of images or a saved dataset, parquet, Arrow or CSV (``io.readers``)."""
    if layer is None and path.is_dir():
        rows = read_folder(path, key, max_bytes)
        return _Read(rows if limit is None else rows.head(limit), len(rows), rows.shape)
    size = regular_file(path, DataError, "data file").st_size
    magic = _magic(path)
    if magic.startswith(b"\x80"):
        if path.suffix.lower() in (".pt", ".pth"):
            raise torch_file(path)
        raise DataError(path, "a Python pickle; vaeeval never unpickles files — save the array with numpy.save")
    if magic.startswith(b"PK") and is_torch_zip(path):
        raise torch_file(path)
    if is_hdf5(magic):
        if key is not None:
            raise _key_with_h5ad(path)
        rows = read_matrix(path, layer, recorded_layer=recorded_layer, max_bytes=max_bytes)
        return _Read(rows if limit is None else rows.head(limit), len(rows), rows.shape)
    if layer is not None:
        raise DataError(path, f"{option('layer')} selects a layer of an .h5ad (AnnData) file, and this is not one")
    other = None if magic.startswith((b"PK", b"\x93NUMPY")) else read_other(path, magic, key, max_bytes)
    if other is not None:
        return _Read(other, len(other), tuple(other.shape))
    if key is not None and not magic.startswith(b"PK"):
        raise DataError(path, f"{option('key')} selects an array of an .npz file, and this is not one")
    try:
        if magic.startswith(b"\x93NUMPY"):
            read = _from_npy(path, size)
        elif magic.startswith(b"PK"):
            read = _from_npz(path, key, limit, max_bytes)
        else:
            raise DataError(path, "not a .npy or .npz file, nor an .h5ad (AnnData), parquet, Arrow or .csv file, nor a folder of "
                            "images or a saved dataset")
    except (ValueError, OSError, EOFError, OverflowError, MemoryError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile,
            zlib.error) as error:  # what numpy's header parser and zipfile raise on a broken file
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(path, f"truncated or corrupt ({text})") from None
    return read


def _magic(path: Path) -> bytes:
    """A file's first bytes, enough to tell a pickle, ``.npy``, ``.npz`` (zip) and ``.h5ad`` (HDF5) apart."""
    with reading(path, DataError, "data file"), path.open("rb") as handle:
        return handle.read(8)


def _is_h5ad(path: Path) -> bool:
    regular_file(path, DataError, "data file")
    return is_hdf5(_magic(path))


def _key_with_h5ad(path: Path) -> DataError:
    return DataError(path, f"{option('key')} selects an array of an .npz file; an .h5ad holds X and layers ({option('layer')})")


def _header(stream: IO[bytes], path: Path, where: str = "") -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """A ``.npy`` header: shape, Fortran order, dtype, and the bytes of the whole array; refused if not numeric."""
    version = np.lib.format.read_magic(stream)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(stream, max_header_size=10_000)
    if dtype.hasobject:
        raise DataError(path, f"{where}holds Python objects (dtype object); vaeeval reads numeric arrays and never unpickles")
    if dtype.kind not in _NUMERIC_KINDS:
        raise DataError(path, f"{where}holds {dtype} values; vaeeval needs a numeric (bool, integer or float) array")
    return shape, fortran, dtype, math.prod(shape) * dtype.itemsize


def _from_npy(path: Path, size: int) -> _Read:
    with path.open("rb") as handle:
        shape, _, _, needed = _header(handle, path)
        start = handle.tell()
    if start + needed > size:
        raise DataError(path, f"truncated or corrupt: its header declares {list(shape)}, {needed:,} bytes, and {size - start:,} follow it")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return _Read(array, int(shape[0]) if shape else 0, tuple(shape))


def _from_npz(path: Path, key: str | None, limit: int | None, max_bytes: int) -> _Read:
    """One member of an ``.npz``, checked by its header before anything is inflated, inflated only as far as needed."""
    with path.open("rb") as handle, zipfile.ZipFile(handle) as archive:
        members = {info.filename: info for info in archive.infolist()}
        stray = [name for name in members if not name.endswith(".npy")]
        if stray:
            raise DataError(path, f"member {stray[0]!r} is not a .npy array; an .npz holds only arrays")
        names = [name[: -len(".npy")] for name in members]
        if not names:
            raise DataError(path, "an .npz file with no arrays")
        if key is None:
            if len(names) > 1:
                raise DataError(path, f"holds several arrays ({', '.join(names)}); choose one with {option('key')}")
            key = names[0]
        if key not in names:
            raise DataError(path, f"has no array {key!r}; it holds {', '.join(names)}")
        info = members[f"{key}.npy"]
        with archive.open(info) as stream:
            shape, fortran, dtype, needed = _header(stream, path, f"array {key!r} ")
            rows = int(shape[0]) if shape else 0
            if needed > max_bytes:
                raise DataError(
                    path, f"array {key!r} is {list(shape)} {dtype}: {needed:,} bytes inflated, more than the "
                    f"{max_bytes:,} allowed ({option('max_data_size')})"
                )
            if info.file_size < stream.tell() + needed:
                raise DataError(path, f"array {key!r}: its header declares {needed:,} bytes, the archive holds {info.file_size:,}")
            take = rows if limit is None or fortran or not shape else min(limit, rows)
            row_bytes = needed // rows if rows else 0
            buffer = _read_exactly(stream, take * row_bytes)
            if take == rows:
                stream.read(1)  # to the member's end: zipfile checks its CRC there
    array = np.frombuffer(buffer, dtype=dtype)
    array = array.reshape(shape[::-1]).transpose() if fortran else array.reshape((take, *shape[1:]))
    return _Read(array, rows, tuple(shape))


def _read_exactly(stream: IO[bytes], count: int) -> bytearray:
    buffer = bytearray(count)
    view, done = memoryview(buffer), 0
    while done < count:
        got = stream.readinto(view[done:])
        if not got:
            raise EOFError(f"the array ends after {done:,} of {count:,} bytes")
        done += got
    return buffer


def _shaped(path: Path, array: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    dims = math.prod(input_shape)
    if array.shape[1:] == input_shape:
        shaped = array
    elif (array.ndim == 2 or isinstance(array, Rows)) and math.prod(array.shape[1:]) == dims:  # [N, D], or images' [N, C, H, W]
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
    likelihood, domain, expected = model.likelihood, model.domain, model.expected_range
    detector = DomainDetector()
    out_of_range = None
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
        bad = None if expected is None else ranges.outside(block, expected[0], expected[1])
        if bad is not None and bad.any():
            out_of_range = out_of_range or _first_bad(start, block, bad)  # named after the scan, with the whole data's range
            continue
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
    if out_of_range:
        raise DataError(dataset.path, ranges.range_message(out_of_range, detector, expected, dataset.array))
    return detector.domain()
