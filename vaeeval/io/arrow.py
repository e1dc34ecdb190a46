"""Parquet files, Arrow IPC files and Hugging Face ``datasets`` saved to disk: one column as data, read a block of rows at a time.

The points are the rows of one column (``--key COLUMN``; a table of one column needs
none): a number per row gives ``[N, 1]``, a list of numbers ``[N, D]``, lists of lists
``[N, A, B]``; every row must have the first row's shape and no missing value, which is
checked as the rows are read (vaeeval reads all of them once, up front). A parquet
file is read one row group at a time (each no larger than ``--max-data-size``); an
Arrow file, and the ``.arrow`` files of a folder ``Dataset.save_to_disk`` wrote (named
in its ``state.json``), are memory-mapped. pyarrow is imported only when such a file
is read (the ``arrow`` extra).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vaeeval.errors import DataError, listing, option
from vaeeval.io.files import guarded, load_json, reading, regular_file
from vaeeval.io.h5ad import Rows

if TYPE_CHECKING:
    import pyarrow as pa

ARROW_MISSING = "reading parquet and arrow files needs the arrow extra: pip install 'vaeeval[arrow]'"
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
_MAX_STATE_BYTES = 1 << 20


def is_arrow(magic: bytes) -> bool:
    """Whether a file's first bytes are a parquet file's, an Arrow IPC file's or an Arrow stream's."""
    return magic.startswith((PARQUET_MAGIC, ARROW_FILE_MAGIC, ARROW_STREAM_MAGIC))


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` is what ``datasets``' ``save_to_disk`` writes (a ``state.json``, or a ``dataset_dict.json``)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


class TableRows(Rows):
    """One column's rows as dense ``[k, *point_shape]`` arrays, read when asked for (``Rows``'s indexing)."""

    def __init__(self, path: Path, column: str, rows: int, point: _Point, read: Callable[[int, int], Any],
                 take: Callable[[np.ndarray], Any]) -> None:
        shape, dtype, self._image = point
        super().__init__(path, rows, math.prod(shape), dtype, None)
        self._point_shape = self._shape = shape  # reshape() changes only the first
        self.column = column
        self._read, self._pick = read, take

    @property
    def where(self) -> str:
        return f"column {self.column!r}"

    def _guarded(self) -> contextlib.AbstractContextManager[None]:
        return _guard(self.path)

    def _slice(self, start: int, stop: int) -> np.ndarray:
        return self._values(self._read(start, stop), np.arange(start, stop))

    def _take(self, rows: np.ndarray) -> np.ndarray:
        return self._values(self._pick(rows), rows)

    def _values(self, values: pa.Array, rows: np.ndarray) -> np.ndarray:
        if self._image is None:
            return _numbers(self.path, self.column, values, int(rows[0]) if len(rows) and rows[-1] - rows[0] == len(rows) - 1
                            else None, self._shape)
        return np.stack([_image(self.path, self.column, values, at, int(row), self._image)[0] for at, row in enumerate(rows)])


_Point = tuple[tuple[int, ...], np.dtype, Any]  # a point's shape and dtype; for an image column, the first image's header


def read_table(path: Path, magic: bytes, key: str | None, max_bytes: int) -> TableRows:
    """The column ``key`` of a parquet or Arrow file (a file of one column: that one).

    Raises:
        DataError: pyarrow missing; broken; no such column, several and no ``key``; a column that
            does not hold numbers or lists of them; a parquet row group larger than ``max_bytes``.
    """
    _require_pyarrow(path)
    with _guard(path):
        if magic.startswith(PARQUET_MAGIC):
            return _parquet(path, key, max_bytes)
        return _from_table(path, _arrow_table(path, magic, max_bytes), key, max_bytes)


def read_saved_dataset(folder: Path, key: str | None, max_bytes: int) -> TableRows:
    """The column ``key`` of a ``Dataset`` that ``save_to_disk`` wrote to ``folder``: its ``.arrow`` files, memory-mapped.

    Raises:
        DataError: pyarrow missing; a ``DatasetDict`` (several splits); a ``state.json`` that names
            no data files or files outside the folder; as ``read_table``.
    """
    _require_pyarrow(folder)
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file() and not (folder / "state.json").is_file():
        splits = sorted(entry.name for entry in folder.iterdir() if (entry / "state.json").is_file())
        raise DataError(folder, f"a DatasetDict saved by Hugging Face datasets; give one split's folder ({listing(splits)})")
    state_path = folder / "state.json"
    if regular_file(state_path, DataError, "state.json").st_size > _MAX_STATE_BYTES:
        raise DataError(state_path, f"is larger than {_MAX_STATE_BYTES:,} bytes; not a state.json datasets wrote")
    with reading(state_path, DataError, "state.json"):
        text = state_path.read_bytes()
    try:
        state = load_json(text, "state.json")
    except ValueError as error:
        raise DataError(state_path, f"not JSON a Hugging Face dataset writes ({str(error).splitlines()[0]})") from None
    files = state.get("_data_files") if isinstance(state, dict) else None
    names = [entry.get("filename") for entry in files] if isinstance(files, list) and all(isinstance(e, dict) for e in files) else None
    if not names or not all(isinstance(name, str) and name and Path(name).name == name and name not in (".", "..") for name in names):
        raise DataError(state_path, "names no data files (its _data_files); not a Dataset saved by save_to_disk")
    tables = []
    for name in names:
        path = folder / name
        regular_file(path, DataError, "data file")
        with _guard(path):
            tables.append(_arrow_table(path, _magic(path), max_bytes))
    with _guard(folder):
        return _from_table(folder, pa.concat_tables(tables), key, max_bytes)


# ---------------------------------------------------------------- the files


def _require_pyarrow(path: Path) -> None:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(path, ARROW_MISSING) from None


def _magic(path: Path) -> bytes:
    with reading(path, DataError, "data file"), path.open("rb") as handle:
        return handle.read(8)


def _arrow_table(path: Path, magic: bytes, max_bytes: int) -> pa.Table:
    """An Arrow IPC file or stream, memory-mapped: its buffers stay on disk until rows are read. A compressed one is
    inflated into memory as its batches are read, and refused once that passes ``max_bytes``."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    if magic.startswith(ARROW_FILE_MAGIC):
        reader = pa.ipc.open_file(source)
        batches: Any = (reader.get_batch(index) for index in range(reader.num_record_batches))
    elif magic.startswith(ARROW_STREAM_MAGIC):
        reader = batches = pa.ipc.open_stream(source)
    else:
        raise DataError(path, "not an Arrow file or stream")
    before, read = pa.total_allocated_bytes(), []
    for batch in batches:
        read.append(batch)
        if pa.total_allocated_bytes() - before > max_bytes:
            raise DataError(path, f"inflates to more than the {max_bytes:,} bytes allowed ({option('max_data_size')}): its "
                            "buffers are compressed; write it uncompressed, and it is memory-mapped instead")
    return pa.Table.from_batches(read, schema=reader.schema)


def _column_name(path: Path, names: list[str], key: str | None) -> str:
    if key is not None:
        if key not in names:
            raise DataError(path, f"has no column {key!r} ({option('key')}); it has {listing(names, 8, counted=True)}")
        return key
    if len(names) != 1:
        raise DataError(path, f"holds {len(names)} columns ({listing(names, 8, counted=True)}); choose the one holding the "
                        f"points with {option('key')}")
    return names[0]


def _from_table(path: Path, table: pa.Table, key: str | None, max_bytes: int) -> TableRows:
    import pyarrow as pa

    name = _column_name(path, list(table.column_names), key)
    column = table.column(name)
    column.validate(full=True)  # offsets and lengths inside the buffers, before anything trusts them
    point = _point(path, name, column.type, column.slice(0, 1).combine_chunks() if len(column) else None, max_bytes)
    return TableRows(path, name, len(column), point, lambda start, stop: column.slice(start, stop - start).combine_chunks(),
                     lambda rows: column.take(pa.array(rows)).combine_chunks())


def _parquet(path: Path, key: str | None, max_bytes: int) -> TableRows:
    """A parquet file's column, read one row group at a time (the last one read is kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(str(path))
    name = _column_name(path, list(file.schema_arrow.names), key)
    metadata = file.metadata
    sizes = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).total_byte_size
        if size > max_bytes:
            raise DataError(path, f"row group {group} is {size:,} bytes uncompressed, more than the {max_bytes:,} allowed "
                            f"({option('max_data_size')}); write it with smaller row groups (row_group_size)")
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    kept: dict[int, Any] = {}

    def group_column(group: int) -> Any:
        if group not in kept:
            kept.clear()
            kept[group] = file.read_row_group(group, columns=[name]).column(0).combine_chunks()
        return kept[group]

    def read(start: int, stop: int) -> Any:
        pieces = []
        for group in range(int(np.searchsorted(starts, start, "right")) - 1, len(sizes)):
            if starts[group] >= stop:
                break
            low, high = max(start, starts[group]) - starts[group], min(stop, starts[group + 1]) - starts[group]
            pieces.append(group_column(group).slice(int(low), int(high - low)))
        return pa.concat_arrays(pieces) if pieces else pa.array([], type=file.schema_arrow.field(name).type)

    def take(rows: np.ndarray) -> Any:
        groups = np.searchsorted(starts, rows, "right") - 1
        pieces = [group_column(int(g)).take(pa.array(rows[groups == g] - starts[g])) for g in np.unique(groups)]
        return pa.concat_arrays(pieces)

    first = read(0, 1) if starts[-1] else None
    return TableRows(path, name, int(starts[-1]), _point(path, name, file.schema_arrow.field(name).type, first, max_bytes), read, take)


# ---------------------------------------------------------------- a column's values


def _is_list(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _point(path: Path, name: str, kind: pa.DataType, first: pa.Array | None, max_bytes: int) -> _Point:
    """A point's shape (from the first row) and dtype; refuses a column that holds neither numbers nor images."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shape: list[int] = []
    values = first
    while _is_list(kind):
        if values is not None:
            _no_missing(path, name, values, 0, shape)
            shape.append(int(pc.list_value_length(values)[0].as_py()))
            values = values.flatten()
        kind = kind.value_type
    if pa.types.is_struct(kind) and not shape and kind.get_field_index("bytes") >= 0:  # the datasets Image feature
        if first is None:
            raise DataError(path, "holds no rows")
        pixels, header = _image(path, name, first, 0, 0, None, max_bytes)
        return pixels.shape, np.dtype(np.float32), header
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
        raise DataError(path, f"column {name!r} holds {kind} values; vaeeval needs numbers, or lists of numbers, per row")
    if first is None:
        raise DataError(path, "holds no rows")
    return tuple(shape) or (1,), np.dtype(kind.to_pandas_dtype()), None


def _image(path: Path, name: str, values: pa.Array, at: int, row: int, first: Any, max_bytes: int | None = None) -> Any:
    """Row ``row`` (at ``at`` in ``values``) of a column of encoded images: its pixels (k/255) and header (``images.decode``)."""
    from vaeeval.io.images import decode

    data = values.field("bytes")[at].as_py() if values[at].is_valid else None
    if not data:
        raise DataError(path, f"column {name!r}, row {row} holds no image bytes (a path only, or nothing); vaeeval reads the "
                        "images a dataset holds, not files it points to")
    return decode(path, data, f"column {name!r}, row {row}", first, max_bytes)


def _numbers(path: Path, name: str, values: pa.Array, start: int | None, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of a column as ``[k, *shape]``: every row the first row's shape, nothing missing.

    ``start``: the first row's number in the column (None: rows taken out of order).
    """
    import pyarrow.compute as pc

    rows, level = len(values), 0
    while _is_list(values.type):
        _no_missing(path, name, values, start, shape[:level])
        lengths = np.asarray(pc.list_value_length(values).to_numpy(zero_copy_only=False), dtype=np.int64)
        bad = np.flatnonzero(lengths != shape[level])
        if bad.size:
            row = int(bad[0]) // max(1, math.prod(shape[:level]))
            where = "a row" if start is None else f"row {start + row}"
            raise DataError(path, f"column {name!r}: {where} is not shaped {list(shape)} like the first row (a list of "
                            f"{int(lengths[bad[0]])} where {shape[level]} are needed); every point needs the same shape")
        values, level = values.flatten(), level + 1
    _no_missing(path, name, values, start, shape[:level])
    return values.to_numpy(zero_copy_only=False).reshape(rows, *shape)


def _no_missing(path: Path, name: str, values: pa.Array, start: int | None, outer: tuple[int, ...] | list[int]) -> None:
    if values.null_count:
        index = int(np.flatnonzero(np.asarray(values.is_null().to_numpy(zero_copy_only=False)))[0])
        row = index // max(1, math.prod(outer))
        where = "a row" if start is None else f"row {start + row}"
        raise DataError(path, f"column {name!r}: {where} has a missing value (null); every point needs all its values")


def _guard(path: Path) -> contextlib.AbstractContextManager[None]:
    """Whatever pyarrow raises on a file's content is one line naming the file."""
    return guarded(path, "truncated or corrupt parquet or arrow data")
