""".h5ad files that point outside themselves or whose sparse matrix lies (issue 28, round 2).

An HDF5 file can send its reader to other files: an external link, a dataset whose bytes
lie in a raw file (external storage), a virtual dataset. A FIFO there hung the read
forever; any other file was read as if it were the data. vaeeval reads only what is inside
the file it is given. A CSR matrix with float indices was read with the indices truncated.
Runs that could hang are subprocesses with a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from conftest import tiny_bernoulli

from vaeeval.cli import main

anndata = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")
pd = pytest.importorskip("pandas")
sparse = pytest.importorskip("scipy.sparse")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]  # anndata announces its API changes on import

ROOT = Path(__file__).resolve().parents[1]
D, N = 6, 12
X = (np.random.default_rng(0).random((N, D)) < 0.3).astype(np.float32)
COUNTS = (np.random.default_rng(1).random((N, D)) < 0.3).astype(np.float32)
INSIDE = "vaeeval reads only what is inside the file it is given"


def _h5ad(path: Path, matrix: Any) -> Path:
    obs = pd.DataFrame({"batch": pd.Categorical(["a", "b"] * (N // 2)), "size": np.linspace(1.0, 2.0, N)},
                       index=[f"cell{i}" for i in range(N)])
    anndata.AnnData(X=matrix, obs=obs, layers={"counts": COUNTS}).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile_h5ad")
    tiny_bernoulli(root / "model.safetensors", dims=D)
    return {"root": root, "model": root / "model.safetensors", "dense": _h5ad(root / "dense.h5ad", X),
            "csr": _h5ad(root / "csr.h5ad", sparse.csr_matrix(X))}


def _edited(files: dict[str, Path], tmp_path: Path, source: str, edit: Any) -> Path:
    path = tmp_path / "edited.h5ad"
    shutil.copy(files[source], path)
    with h5py.File(path, "r+") as handle:
        edit(handle)
    return path


def _cli(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line(result: Result, path: Path, *phrases: str) -> None:
    why = f"\nexit {result.exit_code}\nstderr {result.stderr!r}\nexception {result.exception!r}"
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.count("\n") == 1, why
    assert result.stderr.startswith(f"vaeeval: error: {path}: "), why
    for phrase in phrases:
        assert phrase in result.stderr, f"lacks {phrase!r}" + why


def _in_subprocess(*args: Any) -> subprocess.CompletedProcess:
    """The command line in its own process: a read that blocks fails the test after 60 s instead of hanging the suite."""
    return subprocess.run([sys.executable, "-m", "vaeeval", *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _external_storage(target: Path, name: str = "X") -> Any:
    """``name`` rewritten as a dataset whose values lie in ``target``, the attributes anndata gave it kept."""

    def edit(handle: Any) -> None:
        attributes = dict(handle[name].attrs)
        shape, dtype = handle[name].shape, handle[name].dtype
        del handle[name]
        size = int(np.prod(shape)) * dtype.itemsize
        stored = handle.create_dataset(name, shape=shape, dtype=dtype, external=[(str(target), 0, size)])
        stored.attrs.update(attributes)

    return edit


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


@needs_fifo
@pytest.mark.parametrize("how", ["external link", "external storage"])
def test_an_x_that_leads_to_a_fifo_is_refused_not_waited_on(files, tmp_path, how):
    """(round 1's leftover) X an external link to a FIFO, or a dataset stored in one: the read blocked forever."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    edit = _external_storage(fifo) if how == "external storage" else (
        lambda handle: (handle.__delitem__("X"), handle.__setitem__("X", h5py.ExternalLink(str(fifo), "/X"))))
    path = _edited(files, tmp_path, "dense", edit)
    done = _in_subprocess("elbo", files["model"], path, "-k", "2")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert str(fifo) in done.stderr and INSIDE in done.stderr, done.stderr


def _linked_x(other: Path) -> Any:
    return lambda handle: (handle.__delitem__("X"), handle.__setitem__("X", h5py.ExternalLink(str(other), "/X")))


def _linked_layers(other: Path) -> Any:
    return lambda handle: (handle.__delitem__("layers"), handle.__setitem__("layers", h5py.ExternalLink(str(other), "/layers")))


def _virtual_x(other: Path) -> Any:
    def edit(handle: Any) -> None:
        attributes = dict(handle["X"].attrs)
        layout = h5py.VirtualLayout(shape=(N, D), dtype=np.float32)
        layout[:] = h5py.VirtualSource(str(other), "X", shape=(N, D))
        del handle["X"]
        handle.create_virtual_dataset("X", layout).attrs.update(attributes)

    return edit


def _stored_csr_data(other: Path) -> Any:
    return _external_storage(other, "X/data")


OUTSIDE = [
    ("X an external link", "dense", _linked_x, [], ["X: /X is a link to the file", INSIDE]),
    ("layers an external link", "dense", _linked_layers, ["--layer", "counts"], ["layers: /layers is a link to the file", INSIDE]),
    ("X virtual", "dense", _virtual_x, [], ["X (/X) is a virtual dataset mapped onto other files", INSIDE]),
    ("CSR values stored outside", "csr", _stored_csr_data, [], ["X (/X/data) keeps its values in the file", INSIDE]),
]


@pytest.mark.parametrize(("case", "source", "make", "args", "phrases"), OUTSIDE, ids=[case[0] for case in OUTSIDE])
def test_what_points_outside_the_file_is_refused_before_it_is_read(files, tmp_path, case, source, make, args, phrases):
    other = tmp_path / "other.h5ad"
    shutil.copy(files["dense"], other)  # a real file vaeeval could read: refused all the same
    path = _edited(files, tmp_path, source, make(other))
    _one_line(_cli("elbo", files["model"], path, "-k", "2", *args), path, *phrases)


def test_obs_that_points_outside_is_refused_for_covariates(files, tmp_path):
    from vaeeval.errors import DataError
    from vaeeval.format.data import read_covariates

    other = tmp_path / "other.h5ad"
    shutil.copy(files["dense"], other)
    path = _edited(files, tmp_path, "dense", lambda handle: (
        handle["obs"].__delitem__("size"), handle["obs"].__setitem__("size", h5py.ExternalLink(str(other), "/obs/size"))))
    with pytest.raises(DataError, match="obs: /obs/size is a link to the file .*" + INSIDE):
        read_covariates(path, ["size"])


def test_a_soft_link_inside_the_file_is_followed(files, tmp_path):
    """X a soft link to the counts layer: the same file, read as the layer."""
    path = _edited(files, tmp_path, "dense",
                   lambda handle: (handle.__delitem__("X"), handle.__setitem__("X", h5py.SoftLink("/layers/counts"))))
    through_x = _cli("elbo", files["model"], path, "-k", "2", "--json")
    as_layer = _cli("elbo", files["model"], files["dense"], "-k", "2", "--layer", "counts", "--json")
    assert through_x.exit_code == 0 and as_layer.exit_code == 0, through_x.stderr + as_layer.stderr
    assert _numbers(through_x) == _numbers(as_layer)


def test_soft_links_in_a_cycle_end_in_one_line(files, tmp_path):
    path = _edited(files, tmp_path, "dense", lambda handle: (handle.__delitem__("X"), handle.__setitem__("X", h5py.SoftLink("/X"))))
    _one_line(_cli("elbo", files["model"], path, "-k", "2"), path, "soft links nested more than 32 deep")


def _numbers(result: Result) -> list[Any]:
    import json

    return [point["iwae"] for point in json.loads(result.stdout)["points"]]


# ---------------------------------------------------------------- a CSR matrix's indices and pointers


def _replace(name: str, value: Any) -> Any:
    def edit(handle: Any) -> None:
        del handle[name]
        handle[name] = value

    return edit


def _csr(part: str, change: Any) -> Any:
    def edit(handle: Any) -> None:
        _replace(f"X/{part}", change(handle[f"X/{part}"][...]))(handle)

    return edit


def _set(index: int, value: int) -> Any:
    def change(array: np.ndarray) -> np.ndarray:
        array[index] = value
        return array

    return change


SPARSE = [
    ("float indices", _csr("indices", lambda indices: indices.astype(np.float64) + 0.7),
     ["X: its indices are float64, not whole numbers: corrupt"]),
    ("float indptr", _csr("indptr", lambda pointers: pointers.astype(np.float32)),
     ["X: its indptr are float32, not whole numbers: corrupt"]),
    ("indptr from 1", _csr("indptr", _set(0, 1)), ["X: its indptr is not a non-decreasing run of offsets from 0"]),
    ("indptr decreasing at the end", _csr("indptr", _set(-1, -2)), ["X: its indptr is not a non-decreasing run"]),
    ("indptr ends early", _csr("indptr", lambda pointers: np.minimum(pointers, pointers[-1] - 1)),
     ["X: its indptr ends at", "not at its", "stored values: truncated or corrupt"]),
    ("fewer indices than values", _csr("indices", lambda indices: indices[:-1]),
     ["indices for", "stored values: truncated or corrupt"]),
    ("indices of two axes", _csr("indices", lambda indices: indices.reshape(1, -1)), ["X: its indices is [1,"]),
]


@pytest.mark.parametrize(("case", "edit", "phrases"), SPARSE, ids=[case[0] for case in SPARSE])
def test_a_csr_matrix_whose_indices_or_pointers_lie_is_one_line(files, tmp_path, case, edit, phrases):
    path = _edited(files, tmp_path, "csr", edit)
    _one_line(_cli("elbo", files["model"], path, "-k", "2"), path, *phrases)


def test_the_pointers_are_checked_a_block_at_a_time_across_blocks(files, tmp_path, monkeypatch):
    """A decrease that straddles two blocks of indptr is found; no block is more than the block size."""
    import vaeeval.io.h5ad as h5ad

    monkeypatch.setattr(h5ad, "_POINTER_BLOCK", 4)

    def straddle(pointers: np.ndarray) -> np.ndarray:
        pointers[4] = pointers[3] - 1  # the first entry of the second block below the last of the first
        return pointers

    good = _cli("elbo", files["model"], files["csr"], "-k", "2")
    assert good.exit_code == 0, good.stderr
    path = _edited(files, tmp_path, "csr", _csr("indptr", straddle))
    _one_line(_cli("elbo", files["model"], path, "-k", "2"), path, "X: its indptr is not a non-decreasing run")
    with h5py.File(files["csr"], "r") as handle:
        pointers = _Counted(handle["X/indptr"][...])
        h5ad._check_pointers(files["csr"], "X", pointers, N, int(handle["X/data"].shape[0]))
    assert sum(pointers.reads) == N + 1 and max(pointers.reads) == 4


class _Counted:
    """An indptr that records how many entries each read takes."""

    def __init__(self, values: np.ndarray) -> None:
        self.values, self.shape, self.dtype, self.reads = values, values.shape, values.dtype, []

    def __getitem__(self, index: slice) -> np.ndarray:
        self.reads.append(self.values[index].size)
        return self.values[index]
