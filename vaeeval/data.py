"""Data: read ``.npy``/``.npz`` without unpickling, and check it against a model.

Every check runs over the whole selected data before anything is computed:
shape, finiteness, the likelihood's support and the model's declared domain.
A failure names the point, the element and the value found, and what was needed.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from fractions import Fraction
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vaeeval.errors import DataError, SpecError, reading

if TYPE_CHECKING:
    from vaeeval.model import Model

_NUMERIC_KINDS = "biuf"
_GRID_TOLERANCE = 1e-4  # in units of one grid step: float32 k/(L-1) is well within it
_SCAN_ELEMENTS = 1 << 22
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # elements per block when scanning data for bad values


@dataclass(frozen=True)
class Domain:
    """What the model expects its data to look like (format 1's ``data.domain``)."""

    kind: str
    levels: int | None = None

    def outside(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask of the (finite) values of ``x`` outside this domain."""
        if self.kind == "binary":
            return (x != 0) & (x != 1)
        if self.kind == "real":
            return np.zeros(x.shape, dtype=bool)
        outside = (x < 0) | (x > 1)
        if self.kind == "discrete":
            steps = np.asarray(x, dtype=np.float64) * (self.levels - 1)
            outside |= np.abs(steps - np.round(steps)) > _GRID_TOLERANCE
        return outside

    def describe(self) -> str:
        """In words, for messages and tables."""
        return {
            "binary": "binary data (0 or 1)",
            "discrete": f"discrete data on {self.levels} levels k/{(self.levels or 2) - 1}",
            "unit_interval": "data in [0, 1]",
            "real": "real-valued data",
        }[self.kind]

    @property
    def grid_levels(self) -> int | None:
        """The number of values k/(L-1) this domain allows, for binary and discrete data."""
        return 2 if self.kind == "binary" else self.levels

    def to_spec(self) -> dict[str, Any]:
        """The format-1 ``data`` block."""
        return {"domain": self.kind} if self.levels is None else {"domain": self.kind, "levels": self.levels}


DOMAINS = ("binary", "discrete", "unit_interval", "real")


def domain_from_spec(spec: Any) -> Domain | None:
    """Parse a format-1 ``data`` block (``None`` when absent).

    Raises:
        SpecError: not an object, unknown domain, or ``discrete`` without valid ``levels``.
    """
    if spec is None:
        return None
    if not isinstance(spec, Mapping) or "domain" not in spec:
        raise SpecError(f"\"data\" must be an object with a \"domain\", found {spec!r}")
    kind = spec["domain"]
    if kind not in DOMAINS:
        raise SpecError(f"data domain {kind!r} is not one of {', '.join(DOMAINS)}")
    if kind != "discrete":
        return Domain(kind)
    levels = spec.get("levels")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise SpecError(f"data domain \"discrete\" needs \"levels\", an integer >= 2, found {levels!r}")
    return Domain(kind, levels)


@dataclass(frozen=True)
class Dataset:
    """Data points ready to evaluate: ``array`` is ``[N, *input_shape]`` (possibly memory-mapped).

    ``domain`` is what the values are, as detected: the smallest of binary,
    discrete (on some k/(L-1) grid), unit_interval and real that holds them all.
    """

    array: np.ndarray
    path: Path | None = None
    key: str | None = None
    total: int = 0  # points in the file, before --limit
    domain: Domain = Domain("real")

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def dims(self) -> int:
        return math.prod(self.array.shape[1:])


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
    for _, block in _blocks(array):
        digest.update(np.ascontiguousarray(block).tobytes())
    return f"sha256:{digest.hexdigest()}"


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
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
        raise DataError(path, "--key selects an array of an .npz file, and this is not one")
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
                raise DataError(path, f"holds several arrays ({', '.join(names)}); choose one with --key")
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


def _blocks(array: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    rows = max(1, _SCAN_ELEMENTS // max(1, math.prod(array.shape[1:])))
    for start in range(0, array.shape[0], rows):
        yield start, np.asarray(array[start : start + rows])


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
    for start, block in _blocks(dataset.array):
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


def detect_domain(array: np.ndarray) -> Domain:
    """The smallest domain (binary, discrete, unit_interval, real) holding every value of ``array``."""
    detector = DomainDetector()
    for _, block in _blocks(array):
        detector.update(block)
    return detector.domain()


class DomainDetector:
    """Finds the smallest domain holding every value seen, block by block.

    Discrete data is recognized on grids of up to ``MAX_LEVELS`` levels: the
    distinct values (at most that many are kept) are read as fractions, and the
    grid is the least common multiple of their denominators.
    """

    MAX_LEVELS = 4097

    def __init__(self) -> None:
        self.low, self.high = math.inf, -math.inf
        self.values: np.ndarray | None = np.empty(0)

    def update(self, block: np.ndarray) -> None:
        if block.size == 0:
            return
        self.low, self.high = min(self.low, float(block.min())), max(self.high, float(block.max()))
        if self.values is not None:
            self.values = np.union1d(self.values, np.unique(block).astype(np.float64))
            if self.values.size > self.MAX_LEVELS:
                self.values = None  # too many distinct values for a grid

    def domain(self) -> Domain:
        if self.low < 0 or self.high > 1:
            return Domain("real")
        levels = None if self.values is None else grid_levels(self.values, self.MAX_LEVELS)
        if levels is None:
            return Domain("unit_interval")
        return Domain("binary") if levels == 2 else Domain("discrete", levels)


def grid_levels(values: np.ndarray, max_levels: int) -> int | None:
    """The smallest L <= max_levels with every value (in [0, 1]) on the grid k/(L-1), or None."""
    step = 1
    for value in values:
        step = math.lcm(step, Fraction(float(value)).limit_denominator(max_levels - 1).denominator)
        if step > max_levels - 1:
            return None
    scaled = values * step
    if np.any(np.abs(scaled - np.round(scaled)) > _GRID_TOLERANCE):
        return None
    return step + 1
