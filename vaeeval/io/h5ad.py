"""AnnData ``.h5ad`` files as data: the matrix (X or a layer) read a block of rows at a time, covariates from ``obs``.

An ``.h5ad`` is an HDF5 file anndata writes: the points are the rows of ``X`` (or of
``layers/<name>``), dense or sparse, and ``obs`` is a data frame with one row per point.
Single-cell matrices are large and mostly zeros, so the matrix is never made dense
whole: ``SparseRows`` and ``DenseRows`` read the rows asked for and give them dense,
which is all ``check_values``, the digest and the evaluation ever ask for. Nothing is
unpickled, and anndata and h5py are imported only when such a file is read.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vaeeval.errors import DataError, listing, option
from vaeeval.io.files import guarded
from vaeeval.io.hdf5 import check_inside, has, member

if TYPE_CHECKING:
    import h5py
    import pandas as pd

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ANNDATA_MISSING = "reading .h5ad files needs the anndata extra: pip install 'vaeeval[anndata]'"
X = "X"  # the name that selects the main matrix, as a layer name would select a layer
_NUMERIC_KINDS = "biuf"
_SPARSE = ("csr_matrix", "csc_matrix")


def is_hdf5(magic: bytes) -> bool:
    """Whether a file's first bytes are the HDF5 signature (an ``.h5ad`` is an HDF5 file)."""
    return magic.startswith(HDF5_SIGNATURE)


# ---------------------------------------------------------------- the matrix, row by row


class Rows:
    """The rows of a matrix in an ``.h5ad`` file, read when asked for, as dense arrays.

    Enough of ``np.ndarray`` for vaeeval's data: ``shape``, ``dtype``, ``ndim``, ``len``,
    and indexing by a ``slice`` (step 1), an integer, or a 1-D integer array (any order,
    repeats allowed), each giving a dense ``np.ndarray`` of those rows, ``[k, *point_shape]``.
    Nothing reads the whole matrix at once; converting it to one array is refused.
    """

    def __init__(self, path: Path, rows: int, columns: int, dtype: np.dtype, layer: str | None) -> None:
        self.path = path
        self.layer = layer  # None: X
        self.dtype = np.dtype(dtype)
        self._rows = rows
        self._point_shape: tuple[int, ...] = (columns,)
        self._file: Any = None  # the open file, kept open while the rows are read

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._rows, *self._point_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._point_shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self._rows

    @property
    def where(self) -> str:
        """Which matrix of the file: ``X`` or ``layer 'counts'``."""
        return f"layer {self.layer!r}" if self.layer else "X"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.where}, shape={list(self.shape)}, dtype={self.dtype})"

    def head(self, rows: int) -> Rows:
        """The first ``rows`` rows (all of them when there are fewer)."""
        first = copy.copy(self)
        first._rows = max(0, min(rows, self._rows))
        return first

    def reshape(self, *shape: int | tuple[int, ...]) -> Rows:
        """The same rows, each point reshaped: ``shape`` is ``(rows, *point_shape)`` (rows may be -1)."""
        wanted = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else tuple(shape)
        if not wanted or wanted[0] not in (self._rows, -1) or math.prod(wanted[1:]) != math.prod(self._point_shape):
            raise ValueError(f"cannot reshape rows of shape {list(self.shape)} into {list(wanted)}")
        shaped = copy.copy(self)
        shaped._point_shape = tuple(int(size) for size in wanted[1:])
        return shaped

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._rows)
            if step != 1:
                raise IndexError(f"{type(self).__name__} reads slices with step 1, not {step}")
            with self._guarded():
                block = self._slice(start, max(start, stop))
        elif isinstance(index, int | np.integer):
            return self[np.array([index])][0]
        else:
            block = self._rows_at(np.asarray(index))
        return np.asarray(block, dtype=self.dtype).reshape(len(block), *self._point_shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(f"{self!r} is read a block of rows at a time (rows[start:stop]), never whole")

    def _rows_at(self, indices: np.ndarray) -> np.ndarray:
        if indices.ndim != 1 or (indices.size and indices.dtype.kind not in "iu"):
            raise IndexError(f"rows are taken by a slice, an integer or a 1-D integer array, not {indices.dtype} {list(indices.shape)}")
        indices = indices.astype(np.int64)
        indices = np.where(indices < 0, indices + self._rows, indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self._rows):
            raise IndexError(f"row index out of range for {self._rows} rows")
        unique, inverse = np.unique(indices, return_inverse=True)  # sorted and distinct, as HDF5 reads them
        if not unique.size:
            return np.empty((0, math.prod(self._point_shape)), dtype=self.dtype)
        start, stop = int(unique[0]), int(unique[-1]) + 1
        with self._guarded():
            if stop - start <= 2 * unique.size:  # close together: one read of the span is cheaper than one per row
                block = self._slice(start, stop)[unique - start]
            else:
                block = self._take(unique)
        return block[inverse]

    def _guarded(self) -> contextlib.AbstractContextManager[None]:
        """Where the file's content makes the reader raise anything, one ``DataError`` naming the file."""
        return _guard(self.path)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, dense, ``[stop - start, columns]``."""
        raise NotImplementedError

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, distinct), dense, ``[len(rows), columns]``."""
        raise NotImplementedError


class DenseRows(Rows):
    """Rows of a dense matrix: an HDF5 dataset, read a slice at a time."""

    def __init__(self, path: Path, dataset: h5py.Dataset, layer: str | None) -> None:
        rows, columns = (int(size) for size in dataset.shape)
        super().__init__(path, rows, columns, dataset.dtype, layer)
        self._dataset = dataset

    def _slice(self, start: int, stop: int) -> np.ndarray:
        return self._dataset[start:stop]

    def _take(self, rows: np.ndarray) -> np.ndarray:
        return self._dataset[rows]


class SparseRows(Rows):
    """Rows of a sparse matrix, made dense a block at a time.

    A CSR matrix stays on disk: anndata's backed sparse dataset reads the rows asked
    for. A CSC matrix, whose rows are spread over every column, is read into memory on
    first use and kept as a (still sparse) CSR matrix. The row pointers and column
    indices are checked before scipy makes a block dense: scipy trusts them, and a
    corrupt file would otherwise crash the process or write out of bounds.
    """

    def __init__(self, path: Path, group: h5py.Group, layer: str | None) -> None:
        rows, columns = (int(size) for size in group.attrs["shape"])
        super().__init__(path, rows, columns, group["data"].dtype, layer)
        self.format = _text(group.attrs["encoding-type"])
        self._group = group
        self._stored = (rows, columns)  # the matrix in the file, whatever head() and reshape() make of the rows
        self._source: dict[str, Any] = {}  # shared by head() and reshape() copies: a CSC matrix is read once
        if self.format == "csr_matrix":
            _check_pointers(path, self.where, group["indptr"], rows, group["data"].shape[0])
            self._source["rows"] = _sparse_dataset(group)

    def _rows_source(self) -> Any:
        if "rows" not in self._source:  # CSC, read whole once
            rows, columns = self._stored
            matrix = _sparse_dataset(self._group).to_memory()
            _check_pointers(self.path, self.where, np.asarray(matrix.indptr), columns, min(matrix.data.size, matrix.indices.size))
            _check_indices(self.path, self.where, np.asarray(matrix.indices), rows, "row")
            self._source["rows"] = matrix.tocsr()
        return self._source["rows"]

    def _slice(self, start: int, stop: int) -> np.ndarray:
        return self._dense(self._rows_source()[start:stop])

    def _take(self, rows: np.ndarray) -> np.ndarray:
        return self._dense(self._rows_source()[rows])

    def _dense(self, block: Any) -> np.ndarray:
        _check_indices(self.path, self.where, np.asarray(block.indices), block.shape[1], "column")
        return block.toarray()


_POINTER_BLOCK = 1 << 20  # indptr entries checked at a time: a file's row pointers are never all in memory at once


def _check_pointers(path: Path, where: str, pointers: Any, major: int, stored: int) -> None:
    """A compressed matrix's ``indptr`` (an array or an HDF5 dataset, read a block at a time): ``major + 1``
    whole-number offsets into its ``stored`` values, from 0 to ``stored`` and never decreasing."""
    if len(pointers.shape) != 1 or pointers.shape[0] != major + 1 or pointers.dtype.kind not in "iu":
        raise DataError(path, f"{where}: its indptr is {pointers.dtype} {list(pointers.shape)}, not {major + 1} "
                              "whole-number offsets: corrupt")
    previous = 0
    for start in range(0, major + 1, _POINTER_BLOCK):
        block = np.asarray(pointers[start : start + _POINTER_BLOCK]).astype(np.int64)
        if (start == 0 and block[0] != 0) or block[0] < previous or np.any(np.diff(block) < 0) or block[-1] > stored:
            raise DataError(path, f"{where}: its indptr is not a non-decreasing run of offsets from 0 into its {stored:,} "
                                  "stored values: corrupt")
        previous = int(block[-1])
    if previous != stored:
        raise DataError(path, f"{where}: its indptr ends at {previous:,}, not at its {stored:,} stored values: truncated or corrupt")


def _check_indices(path: Path, where: str, indices: np.ndarray, bound: int, axis: str) -> None:
    if indices.dtype.kind not in "iu":
        raise DataError(path, f"{where}: its indices are {indices.dtype}, not integers: corrupt")
    if indices.size and (indices.min() < 0 or indices.max() >= bound):
        bad = indices[(indices < 0) | (indices >= bound)][0]
        raise DataError(path, f"{where}: a stored value's {axis} index is {bad}, outside 0 to {bound - 1}: corrupt")


def read_matrix(path: Path, layer: str | None = None, *, recorded_layer: str | None = None, max_bytes: int | None = None) -> Rows:
    """The data matrix of an ``.h5ad``: ``layers/<layer>``, else the model's ``recorded_layer``, else X.

    The file stays open while the rows are in use. ``X`` as a layer name selects X.

    Args:
        path: the ``.h5ad`` file.
        layer: the layer asked for (``--layer``); None: ``recorded_layer``.
        recorded_layer: the layer the model records (``Model.data_layer``); None: X.
        max_bytes: refuse a CSC matrix (read into memory whole, as CSR) of more bytes than this.

    Raises:
        DataError: anndata missing; not HDF5 or not AnnData, broken or truncated; no such
            layer; a matrix that is not a numeric 2-D dense or CSR/CSC sparse one.
    """
    _require_anndata(path)
    import h5py

    name = layer if layer is not None else recorded_layer
    name = None if name == X else name
    with _guard(path):
        file = h5py.File(path, "r")
    try:
        with _guard(path):
            rows = _matrix(path, file, name, recorded=layer is None and name is not None, max_bytes=max_bytes)
    except BaseException:
        file.close()
        raise
    rows._file = file  # keeps the file open as long as the rows are read
    return rows


def _matrix(path: Path, file: h5py.File, layer: str | None, *, recorded: bool, max_bytes: int | None) -> Rows:
    import h5py

    observations = _observations(path, file)
    where = "X" if layer is None else f"layer {layer!r}"
    element = member(path, file, "X", where) if layer is None else None
    if layer is None and element is None:
        raise DataError(path, f"has no X matrix; {_holdings(path, file)}: choose one with {option('layer')}")
    if layer is not None and layer not in _layers(path, file):
        why = " (the layer the model records)" if recorded else ""
        raise DataError(path, f"has no layer {layer!r}{why}; {_holdings(path, file)}: choose one with {option('layer')}")
    if layer is not None:
        element = member(path, member(path, file, "layers", where), layer, where)
    check_inside(path, element, where)  # before any value is read
    encoding = _text(element.attrs.get("encoding-type", ""))
    if isinstance(element, h5py.Group) and encoding in _SPARSE:
        _check_sparse_arrays(path, where, element, encoding)
        if encoding == "csc_matrix":
            _check_csc_size(path, where, element, max_bytes)
        rows: Rows = SparseRows(path, element, layer)
    elif isinstance(element, h5py.Dataset) and encoding in ("array", ""):
        if element.ndim != 2:
            raise DataError(path, f"{where} has shape {list(element.shape)}; an AnnData matrix is [cells, features]")
        rows = DenseRows(path, element, layer)
    else:
        kind = f"a {encoding} element" if encoding else "an HDF5 group" if isinstance(element, h5py.Group) else "not an array"
        raise DataError(path, f"{where} is {kind}; vaeeval reads a dense array or a CSR or CSC sparse matrix")
    if rows.dtype.hasobject or rows.dtype.kind not in _NUMERIC_KINDS:
        raise DataError(path, f"{where} holds {rows.dtype} values; vaeeval needs numbers (bool, integer or float)")
    if len(rows) != observations:
        raise DataError(path, f"{where} has {len(rows)} rows and obs {observations}: truncated or corrupt")
    return rows


def _check_sparse_arrays(path: Path, where: str, group: h5py.Group, encoding: str) -> None:
    """A sparse matrix's three arrays: 1-D, as many indices as values, and whole-number indices and pointers
    (scipy would truncate 2.7 to column 2 without a word)."""
    import h5py

    arrays = {part: group.get(part) for part in ("data", "indices", "indptr")}
    for part, array in arrays.items():
        if not isinstance(array, h5py.Dataset):
            raise DataError(path, f"{where} is a {encoding} without its {part!r} array: truncated or corrupt")
        if array.ndim != 1:
            raise DataError(path, f"{where}: its {part} is {list(array.shape)}, not one row of numbers: corrupt")
    for part in ("indices", "indptr"):
        if arrays[part].dtype.kind not in "iu":
            raise DataError(path, f"{where}: its {part} are {arrays[part].dtype}, not whole numbers: corrupt")
    if arrays["indices"].shape != arrays["data"].shape:
        raise DataError(path, f"{where}: {arrays['indices'].shape[0]:,} indices for {arrays['data'].shape[0]:,} stored "
                              "values: truncated or corrupt")


def _check_csc_size(path: Path, where: str, group: h5py.Group, max_bytes: int | None) -> None:
    """A CSC matrix is read whole (its rows are spread over every column): refuse one larger than ``max_bytes``."""
    if max_bytes is None:
        return
    needed = 2 * sum(group[part].size * group[part].dtype.itemsize for part in ("data", "indices", "indptr"))
    if needed > max_bytes:
        raise DataError(
            path, f"{where} is a CSC (column by column) sparse matrix, read whole to get at its rows: {needed:,} bytes, more "
            f"than the {max_bytes:,} allowed ({option('max_data_size')}); store it as CSR (adata.X = adata.X.tocsr())"
        )


# ---------------------------------------------------------------- covariates from obs


def read_obs(
    path: Path, names: Sequence[str], *, limit: int | None = None, categories: Mapping[str, Sequence[str]] | None = None
) -> dict[str, np.ndarray]:
    """The ``obs`` columns ``names``, one value per point (the first ``limit``), as covariates.

    A categorical or string column becomes int64 codes: the position of each label in
    ``categories[name]`` (the labels the model was trained with, compared as text) when
    given, else in the column's own categories (sorted distinct strings for a string
    column). A numeric or boolean column stays as it is.

    Raises:
        DataError: anndata missing; not AnnData; a column ``obs`` does not have; a
            missing or non-finite value; a label the model does not know.
    """
    _require_anndata(path)
    import h5py

    if not names:
        return {}
    with _guard(path):
        file = h5py.File(path, "r")
    with file, _guard(path):
        _observations(path, file)
        obs = member(path, file, "obs", "obs")
        check_inside(path, obs, "obs")
        frame = _read_elem(obs)
    found = {}
    for name in names:
        if name not in frame.columns:
            columns = [str(column) for column in frame.columns]
            has = f"it has {listing(columns, 12, counted=True)}" if columns else "it has no columns"
            raise DataError(path, f"obs has no column {name!r} for {option('covariates')}; {has}")
        column = frame[name].iloc[:limit]
        labels = None if categories is None else categories.get(name)
        found[name] = _covariate(path, name, column, labels)
    return found


def _covariate(path: Path, name: str, column: pd.Series, labels: Sequence[str] | None) -> np.ndarray:
    import pandas as pd

    dtype = column.dtype
    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(path, f"covariate {name!r} of point {int(np.argmax(missing))} is missing; every point needs a value")
    if labels is not None or isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype):
        return _codes(path, name, column, labels)
    if pd.api.types.is_bool_dtype(dtype):
        return column.to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
        values = column.to_numpy(dtype=np.dtype(getattr(dtype, "numpy_dtype", dtype)))
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            point = int(np.argmax(~np.isfinite(values)))
            raise DataError(path, f"covariate {name!r} of point {point} is {values[point]}; covariates must be finite")
        return values
    raise DataError(path, f"obs column {name!r} holds {dtype} values; a covariate is a number, a flag, a string or a category")


def _codes(path: Path, name: str, column: pd.Series, labels: Sequence[str] | None) -> np.ndarray:
    """Each point's label as an int64 code: its position in ``labels``, or in the column's own categories."""
    import pandas as pd

    if isinstance(column.dtype, pd.CategoricalDtype):
        categorical = column.array
    else:
        values = column.to_numpy(dtype=object)
        strange = [point for point, value in enumerate(values) if not isinstance(value, str)]
        if labels is None and strange:
            point = strange[0]
            raise DataError(
                path, f"obs column {name!r} holds a {type(values[point]).__name__} at point {point}; a column of objects must hold strings"
            )
        categorical = pd.Categorical(values)  # categories: the distinct values, sorted
    own = categorical.categories
    codes = np.asarray(categorical.codes, dtype=np.int64)
    if labels is None:
        return codes
    position = {str(label): index for index, label in enumerate(labels)}
    lookup = np.array([position.get(str(label), -1) for label in own], dtype=np.int64)
    mapped = lookup[codes]
    unknown = mapped < 0
    if unknown.any():
        point = int(np.argmax(unknown))
        raise DataError(
            path, f"covariate {name!r} of point {point} is {str(own[codes[point]])!r}, a label the model does not know; "
            f"it knows {listing([str(label) for label in labels], 12, counted=True)}"
        )
    return mapped


# ---------------------------------------------------------------- the file


def _require_anndata(path: Path) -> None:
    try:
        import anndata  # noqa: F401
        import h5py  # noqa: F401
    except ImportError:
        raise DataError(path, ANNDATA_MISSING) from None


def _guard(path: Path) -> contextlib.AbstractContextManager[None]:
    """A file's content can make h5py or anndata raise anything: each is a one-line ``DataError`` naming the file."""
    return guarded(path, "truncated or corrupt .h5ad")


def _observations(path: Path, file: h5py.File) -> int:
    """How many points (obs rows) an AnnData file has; refuses an HDF5 file anndata did not write."""
    import h5py

    obs = member(path, file, "obs", "obs")
    kind = _text(file.attrs.get("encoding-type", "anndata"))
    if kind != "anndata" or not isinstance(obs, h5py.Group):
        if isinstance(obs, h5py.Dataset):
            raise DataError(path, "an .h5ad from anndata before 0.8, which vaeeval does not read; write it again with a current anndata")
        raise DataError(path, "an HDF5 file, but not AnnData (.h5ad): it has no obs data frame")
    index = member(path, obs, _text(obs.attrs.get("_index", "_index")), "obs")
    if not isinstance(index, h5py.Dataset):
        raise DataError(path, "obs has no index of cell names: truncated or corrupt")
    return int(index.shape[0])


def _layers(path: Path, file: h5py.File) -> list[str]:
    import h5py

    layers = member(path, file, "layers", "layers")
    return sorted(layers.keys()) if isinstance(layers, h5py.Group) else []


def _holdings(path: Path, file: h5py.File) -> str:
    """``it holds X and the layers counts, log1p``: what a user can choose from."""
    layers = _layers(path, file)
    main = "X" if has(file, "X") else "no X"
    return f"it holds {main} and " + (f"the layers {listing(layers, 12, counted=True)}" if layers else "no layers")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sparse_dataset(group: h5py.Group) -> Any:
    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset
    return sparse_dataset(group)


def _read_elem(element: h5py.Group) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(element)
