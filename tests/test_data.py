"""vaeeval.format.data: reading .npy/.npz without unpickling, shapes, limits, domains and DataError messages."""

from __future__ import annotations

import gc
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import vaeeval.format.domains as domains_module
from vaeeval import DataError, Dataset, VaeevalError, load_data, save_model

D = 6
N = 10

# Reading and checking data must not warn: in the CLI a warning is extra lines on stderr.
# (ResourceWarnings come from the garbage collector at unpredictable times; leaked
# files are tested deterministically in test_corrupt_npz_does_not_leak_the_file.)
pytestmark = [
    pytest.mark.filterwarnings("error"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


# ----------------------------------------------------------------- fixtures


def _save(path: Path, likelihood: dict[str, Any], data: dict[str, Any] | None, input_shape: list[int]):
    torch.manual_seed(0)
    flat = input_shape != [D]
    encoder = nn.Sequential(*([nn.Flatten()] if flat else []), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 4))
    decoder = nn.Sequential(
        nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, D), *([nn.Unflatten(1, tuple(input_shape))] if flat else [])
    )
    return save_model(path, encoder, decoder, likelihood=likelihood, input_shape=input_shape, latent_dim=2, data=data)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("models")
    gaussian = {"family": "gaussian", "sigma": 0.5}
    return {
        "bernoulli": _save(root / "b.safetensors", {"family": "bernoulli"}, {"domain": "binary"}, [D]),
        "gaussian": _save(root / "g.safetensors", gaussian, None, [D]),
        "real": _save(root / "r.safetensors", gaussian, {"domain": "real"}, [D]),
        "unit": _save(root / "u.safetensors", gaussian, {"domain": "unit_interval"}, [D]),
        "discrete5": _save(root / "d5.safetensors", gaussian, {"domain": "discrete", "levels": 5}, [D]),
        "image": _save(root / "i.safetensors", {"family": "bernoulli"}, {"domain": "binary"}, [1, 2, 3]),
    }


def binary(n: int = N, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, D)) < 0.5).astype(np.float32)


def save_npy(path: Path, array: np.ndarray, **kwargs: Any) -> Path:
    np.save(path, array, **kwargs)
    return path


def memmap_in_chain(array: np.ndarray) -> bool:
    """Whether ``array`` is, or is a view of, a numpy memmap."""
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


# ----------------------------------------------------------------- reading .npy / .npz


def test_npy_is_memory_mapped(tmp_path, models):
    path = save_npy(tmp_path / "x.npy", binary())
    ds = load_data(path, models["bernoulli"])
    assert isinstance(ds, Dataset)
    # What actually holds: the dataset's array is itself an np.memmap (a view of the file).
    assert isinstance(ds.array, np.memmap)
    assert memmap_in_chain(ds.array)
    assert not ds.array.flags.writeable  # opened read-only: evaluating never writes to the data file
    np.testing.assert_array_equal(np.asarray(ds.array), binary())
    assert (ds.path, ds.key, ds.total, ds.n, ds.dims) == (path, None, N, N, D)


def test_flat_npy_reshaped_for_image_model_stays_memory_mapped(tmp_path, models):
    path = save_npy(tmp_path / "x.npy", binary())
    ds = load_data(path, models["image"], limit=4)
    assert ds.array.shape == (4, 1, 2, 3)
    assert memmap_in_chain(ds.array)
    np.testing.assert_array_equal(np.asarray(ds.array).reshape(4, D), binary()[:4])
    assert (ds.n, ds.dims, ds.total) == (4, D, N)


def test_shaped_npy_for_image_model(tmp_path, models):
    path = save_npy(tmp_path / "x.npy", binary().reshape(N, 1, 2, 3))
    ds = load_data(str(path), models["image"])  # a str path works too
    assert ds.array.shape == (N, 1, 2, 3)
    assert ds.path == path


@pytest.mark.parametrize(("limit", "n"), [(None, N), (1, 1), (3, 3), (N, N), (N + 5, N)])
def test_limit(tmp_path, models, limit, n):
    path = save_npy(tmp_path / "x.npy", binary())
    ds = load_data(path, models["bernoulli"], limit=limit)
    assert ds.n == n
    assert ds.total == N
    assert ds.array.shape == (n, D)
    np.testing.assert_array_equal(np.asarray(ds.array), binary()[:n])
    assert memmap_in_chain(ds.array)


def test_limit_checks_only_the_selected_points(tmp_path, models):
    x = binary()
    x[7, 1] = 0.5
    path = save_npy(tmp_path / "x.npy", x)
    assert load_data(path, models["bernoulli"], limit=7).n == 7
    with pytest.raises(DataError, match=r"point 7, element \[1\] is 0\.5"):
        load_data(path, models["bernoulli"], limit=8)


def test_npz_with_key(tmp_path, models):
    path = tmp_path / "x.npz"
    train, test = binary(seed=1), binary(n=4, seed=2)
    np.savez(path, train=train, test=test)
    ds = load_data(path, models["bernoulli"], key="test")
    assert ds.key == "test"
    assert (ds.n, ds.total) == (4, 4)
    np.testing.assert_array_equal(np.asarray(ds.array), test)
    ds = load_data(path, models["bernoulli"], key="train", limit=3)
    np.testing.assert_array_equal(np.asarray(ds.array), train[:3])
    assert (ds.n, ds.total) == (3, N)


def test_npz_single_array_needs_no_key(tmp_path, models):
    path = tmp_path / "x.npz"
    np.savez_compressed(path, only=binary())
    ds = load_data(path, models["bernoulli"])
    np.testing.assert_array_equal(np.asarray(ds.array), binary())


@pytest.mark.parametrize(
    "dtype", [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_], ids=lambda d: d.__name__
)
def test_numeric_dtypes_are_accepted(tmp_path, models, dtype):
    path = save_npy(tmp_path / "x.npy", binary().astype(dtype))
    assert load_data(path, models["bernoulli"]).n == N


# ----------------------------------------------------------------- DataError messages
#
# (name, how to make the file -> (model key, path, load_data kwargs), phrases the message must hold)


def _npy(model: str, array: Any, **kwargs: Any):
    def make(root: Path):
        return model, save_npy(root / "x.npy", array() if callable(array) else array, **kwargs), {}

    return make


def _npz(model: str, arrays: dict[str, np.ndarray], **load: Any):
    def make(root: Path):
        np.savez(root / "x.npz", **arrays)
        return model, root / "x.npz", load

    return make


def _raw(content: bytes, name: str = "x.npy"):
    def make(root: Path):
        (root / name).write_bytes(content)
        return "bernoulli", root / name, {}

    return make


def _with(model: str = "bernoulli", dtype: Any = np.float32, **cells: float):
    """Binary data with cells ``p<point>_e<element>`` set to a value."""
    x = binary().astype(dtype)
    for cell, value in cells.items():
        point, element = (int(part[1:]) for part in cell.split("_"))
        x[point, element] = value
    return _npy(model, x)


def _pickle(root: Path):
    with (root / "x.pkl").open("wb") as handle:
        pickle.dump(binary(), handle)
    return "bernoulli", root / "x.pkl", {}


def _object_array():
    array = np.empty((N, D), dtype=object)
    array[:] = 1.0
    return array


def _truncated_npy(root: Path):
    path = save_npy(root / "x.npy", binary())
    path.write_bytes(path.read_bytes()[:-100])
    return "bernoulli", path, {}


def _truncated_npz(root: Path):
    np.savez(root / "x.npz", x=binary())
    (root / "x.npz").write_bytes((root / "x.npz").read_bytes()[:-100])
    return "bernoulli", root / "x.npz", {}


def _directory(root: Path):
    (root / "x.npy").mkdir()
    return "bernoulli", root / "x.npy", {}


ERROR_CASES = [
    ("missing", lambda root: ("bernoulli", root / "nope.npy", {}), ["no such file"]),
    ("directory", _directory, ["holds no PNG or JPEG images"]),
    ("pickle", _pickle, ["pickle", "never unpickles"]),
    ("random-bytes", _raw(bytes(range(256)) * 4), ["not a .npy or .npz file"]),
    ("empty-file", _raw(b""), ["not a .npy or .npz file"]),
    ("truncated-npy", _truncated_npy, ["truncated or corrupt"]),
    ("truncated-npz", _truncated_npz, ["truncated or corrupt"]),
    ("object-npy", _npy("bernoulli", _object_array, allow_pickle=True), ["dtype object", "never unpickles"]),
    ("string-npy", _npy("bernoulli", np.full((N, D), "1")), ["<U1", "numeric"]),
    ("npz-several-no-key", _npz("bernoulli", {"a": binary(), "b": binary()}), ["several arrays (a, b)", "choose one with key"]),
    ("npz-missing-key", _npz("bernoulli", {"a": binary(), "b": binary()}, key="c"), ["no array 'c'", "a, b"]),
    ("key-on-npy", lambda root: ("bernoulli", save_npy(root / "x.npy", binary()), {"key": "a"}), ["key selects an array"]),
    ("wrong-shape", _npy("bernoulli", np.zeros((N, 7), np.float32)), ["[10, 7]", "[N, 6]"]),
    ("wrong-shape-image", _npy("image", np.zeros((N, 2, 3), np.float32)), ["[10, 2, 3]", "[N, 1, 2, 3] or [N, 6]"]),
    ("no-points", _npy("bernoulli", np.zeros((0, D), np.float32)), ["no data points"]),
    ("nan", _with("gaussian", p3_e2=np.nan), ["point 3, element [2] is nan", "finite"]),
    ("inf", _with("gaussian", p0_e5=np.inf), ["point 0, element [5] is inf", "finite"]),
    ("nan-float16", _with("gaussian", np.float16, p9_e0=np.nan), ["point 9, element [0] is nan"]),
    ("bernoulli-0.5", _with(p1_e4=0.5), ["point 1", "element [4]", "0.5", "exactly 0 or 1"]),
    ("bernoulli-negative", _with(p2_e0=-1.0), ["point 2, element [0] is -1", "exactly 0 or 1"]),
    ("bernoulli-int-3", _npy("bernoulli", np.full((N, D), 3, np.int64)), ["point 0, element [0] is 3"]),
    ("discrete-0.3", _with("discrete5", p4_e1=0.3), ["point 4, element [1] is 0.3", "discrete data on 5 levels"]),
    ("discrete-above-1", _with("discrete5", p0_e0=1.25), ["is 1.25", "discrete data on 5 levels"]),
    ("unit-1.5", _with("unit", p6_e3=1.5), ["point 6, element [3] is 1.5", "data in [0, 1]"]),
    ("unit-negative", _with("unit", p6_e3=-0.001), ["is -0.001", "data in [0, 1]"]),
]


@pytest.mark.parametrize(("name", "make", "phrases"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_data_error_messages(tmp_path, models, name, make, phrases):
    model, path, kwargs = make(tmp_path)
    with pytest.raises(DataError) as caught:
        load_data(path, models[model], **kwargs)
    error = caught.value
    message = str(error)
    assert isinstance(error, VaeevalError)
    assert error.path == path
    assert message.startswith(f"{path}: "), message
    assert message == f"{path}: {error.reason}"
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


@pytest.mark.parametrize("make", [_truncated_npy, _truncated_npz, _pickle], ids=["npy", "npz", "pickle"])
def test_corrupt_file_does_not_leak_the_file(tmp_path, models, make):
    """A refused file is closed: a library user scanning many files must not run out of descriptors."""
    model, path, kwargs = make(tmp_path)
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError):
            load_data(path, models[model], **kwargs)
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning) and str(path) in str(w.message)]
    assert not leaks


def test_first_bad_value_is_reported_across_scan_blocks(tmp_path, models, monkeypatch):
    """The scan goes block by block; the point index is the row in the file, not in the block."""
    monkeypatch.setattr(domains_module, "_SCAN_ELEMENTS", 2 * D)  # two points per block
    x = binary()
    x[7, 3] = 0.5
    x[9, 0] = np.nan
    path = save_npy(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"point 7, element \[3\] is 0\.5; the bernoulli likelihood needs exactly 0 or 1"):
        load_data(path, models["bernoulli"])
    with pytest.raises(DataError, match=r"point 9, element \[0\] is nan"):
        load_data(path, models["gaussian"])


def test_element_index_is_within_input_shape(tmp_path, models):
    x = binary()
    x[2, 5] = np.nan  # flat element 5 of a [1, 2, 3] point is [0, 1, 2]
    path = save_npy(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"point 2, element \[0, 1, 2\] is nan"):
        load_data(path, models["image"])


def test_nan_is_reported_as_nan_before_support(tmp_path, models):
    x = binary()
    x[0, 0] = 0.5
    x[0, 1] = np.nan
    path = save_npy(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match="nan; data must be finite"):
        load_data(path, models["bernoulli"])
