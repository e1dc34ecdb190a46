"""AnnData .h5ad files as DATA: X or a layer, dense or sparse, read a block of rows at a time; covariates from obs.

Every check compares with the same matrix saved as .npy: the same values, digest, domain
and per-point numbers, so an .h5ad is nothing but another way to hold the points.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import tiny_bernoulli
from safetensors.torch import save_file
from torch import nn

from vaeeval import DataError, Model, evaluate, load_data, save_model
from vaeeval.cli import main
from vaeeval.format.data import point_shape, read_covariates
from vaeeval.io.h5ad import ANNDATA_MISSING, Rows

anndata = pytest.importorskip("anndata")
h5py = pytest.importorskip("h5py")
pd = pytest.importorskip("pandas")
sparse = pytest.importorskip("scipy.sparse")

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning")]  # anndata announces its API changes on import

D, N = 6, 40
BATCH_LABELS = ["b", "a", "c"]  # the categorical's own order, deliberately not sorted
FORMATS = {"dense": np.asarray, "csr": sparse.csr_matrix, "csc": sparse.csc_matrix}


def binary(n: int, seed: int, dims: int = D) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, dims)) < 0.3).astype(np.float32)


X, COUNTS = binary(N, 0), binary(N, 1)


def observations(n: int) -> pd.DataFrame:
    """obs: a categorical batch, a float, an int, a flag and a string column, one row per cell."""
    return pd.DataFrame(
        {
            "batch": pd.Categorical([BATCH_LABELS[i % 3] for i in range(n)], categories=BATCH_LABELS),
            "size": np.linspace(1.0, 2.0, n),
            "count": np.arange(n, dtype=np.int64) * 7,
            "flag": np.arange(n) % 2 == 0,
            "donor": [["d2", "d1", "d3"][i % 3] for i in range(n)],
        },
        index=[f"cell{i}" for i in range(n)],
    )


def write_h5ad(path: Path, matrix: Any, *, layers: dict[str, Any] | None = None, obs: pd.DataFrame | None = None) -> Path:
    """An .h5ad as anndata writes it; string columns of obs stay strings."""
    n = matrix.shape[0]
    adata = anndata.AnnData(X=matrix, obs=observations(n) if obs is None else obs, layers=layers or {})
    adata.write_h5ad(path, convert_strings_to_categoricals=False)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("h5ad")
    tiny_bernoulli(root / "model.safetensors", dims=D)
    out = {"model": root / "model.safetensors", "x.npy": root / "x.npy", "counts.npy": root / "counts.npy"}
    np.save(out["x.npy"], X)
    np.save(out["counts.npy"], COUNTS)
    for name, make in FORMATS.items():
        out[name] = write_h5ad(root / f"cells_{name}.h5ad", make(X), layers={"counts": make(COUNTS)})
    return out


@pytest.fixture(scope="module")
def model(files: dict[str, Path]) -> Model:
    from vaeeval import load_model

    return load_model(files["model"])


def cli(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def points_of(result: Result) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    assert result.exit_code == 0, (result.stderr, result.exception)
    document = json.loads(result.stdout)
    return document["points"], document["data"]


# ----------------------------------------------------------------- the matrix


@pytest.mark.parametrize("kind", FORMATS)
def test_values_digest_and_domain_equal_the_npy(files, model, kind):
    data, npy = load_data(files[kind], model), load_data(files["x.npy"], model)
    assert isinstance(data.array, Rows) and data.array.shape == (N, D) and data.array.ndim == 2 and len(data.array) == N
    assert data.array.dtype == np.float32 and (data.n, data.total, data.layer) == (N, N, None)
    np.testing.assert_array_equal(data.array[0:N], X)
    assert data.digest == npy.digest
    assert data.domain == npy.domain
    order = np.array([7, 3, 3, 39, 0, 21, -1])  # any order, repeats, negative
    block = data.array[order]
    assert isinstance(block, np.ndarray) and block.dtype == np.float32
    np.testing.assert_array_equal(block, X[order])
    np.testing.assert_array_equal(data.array[np.array([0, 35])], X[[0, 35]])  # rows far apart: read one by one
    np.testing.assert_array_equal(data.array[5], X[5])
    assert data.array[9:3].shape == (0, D) and data.array[np.array([], dtype=np.int64)].shape == (0, D)


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.uint8])
def test_digest_is_that_of_the_npy_of_the_same_dtype(tmp_path, model, kind, dtype):
    values = X.astype(dtype)
    path = write_h5ad(tmp_path / "cells.h5ad", FORMATS[kind](values))
    np.save(tmp_path / "x.npy", values)
    data = load_data(path, model)
    assert data.array.dtype == np.dtype(dtype) and data.array[0:3].dtype == np.dtype(dtype)
    assert data.digest == load_data(tmp_path / "x.npy", model).digest
    assert data.digest != load_data(tmp_path / "x.npy", model, limit=N - 1).digest


def test_points_are_reshaped_for_an_image_model(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 4))
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, D), nn.Unflatten(1, (1, 2, 3)))
    image = save_model(tmp_path / "image.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                       input_shape=[1, 2, 3], latent_dim=2)
    path = write_h5ad(tmp_path / "cells.h5ad", sparse.csr_matrix(X))
    np.save(tmp_path / "x.npy", X)
    data = load_data(path, image)
    assert data.array.shape == (N, 1, 2, 3) and data.dims == D
    np.testing.assert_array_equal(data.array[2:4], X[2:4].reshape(2, 1, 2, 3))
    np.testing.assert_array_equal(data.array[np.array([4, 1])], X[[4, 1]].reshape(2, 1, 2, 3))
    assert data.digest == load_data(tmp_path / "x.npy", image).digest


@pytest.mark.parametrize("kind", FORMATS)
def test_a_layer_is_chosen_by_name_or_by_the_model(files, model, kind):
    counts = load_data(files[kind], model, layer="counts")
    assert counts.layer == "counts" and counts.array.layer == "counts"
    np.testing.assert_array_equal(counts.array[0:N], COUNTS)
    assert counts.digest == load_data(files["counts.npy"], model).digest
    recorded = replace(model, data_layer="counts")
    assert load_data(files[kind], recorded).digest == counts.digest  # the model's layer is the default
    assert load_data(files[kind], recorded, layer="X").digest == load_data(files["x.npy"], model).digest  # X overrides it
    assert point_shape(files[kind], layer="counts") == (D,) == point_shape(files[kind])


@pytest.mark.parametrize("kind", FORMATS)
def test_limit_takes_the_first_rows(files, model, kind):
    data = load_data(files[kind], model, limit=5, covariates=["batch", "size"])
    assert (data.n, data.total) == (5, N) and data.array.shape == (5, D)
    np.testing.assert_array_equal(data.array[0:5], X[:5])
    with pytest.raises(IndexError):
        data.array[np.array([5])]  # the rows past the limit are not there
    assert data.array[0:100].shape == (5, D)
    assert data_digest_without_covariates(data) == load_data(files["x.npy"], model, limit=5).digest
    assert [len(values) for values in data.covariates.values()] == [5, 5]
    np.testing.assert_array_equal(load_data(files[kind], model, layer="counts", limit=7).array[0:7], COUNTS[:7])


def data_digest_without_covariates(data: Any) -> str:
    return replace(data, covariates={}).digest


def test_rows_refuse_what_would_read_the_whole_matrix_or_make_no_sense(files, model):
    rows = load_data(files["csr"], model).array
    with pytest.raises(TypeError, match="never whole"):
        np.asarray(rows)
    with pytest.raises(IndexError, match="step 1"):
        rows[::2]
    with pytest.raises(IndexError, match="out of range"):
        rows[np.array([N])]
    with pytest.raises(IndexError):
        rows[np.array([True, False])]
    assert rows.reshape(N, 3, 2).shape == (N, 3, 2) and rows.reshape((-1, D)).shape == (N, D)
    with pytest.raises(ValueError, match="cannot reshape"):
        rows.reshape(N, 5)


# ----------------------------------------------------------------- never dense whole


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_the_matrix_is_never_made_dense_whole(tmp_path, monkeypatch, kind):
    """A block of rows at a time through the checks, the digest and the evaluation, whatever the order."""
    n = 200
    values = binary(n, 3)
    path = write_h5ad(tmp_path / "big.h5ad", FORMATS[kind](values))
    model = tiny_bernoulli(tmp_path / "model.safetensors", dims=D)
    monkeypatch.setattr("vaeeval.format.domains._SCAN_ELEMENTS", 10 * D)  # the checks and the digest: 10 rows per block
    made_dense: list[int] = []
    read: list[int] = []
    for cls in (sparse.csr_matrix, sparse.csr_array, sparse.csc_matrix, sparse.csc_array):
        original = cls.toarray

        def spy(self, *args: Any, _original: Any = original, **kwargs: Any) -> np.ndarray:
            made_dense.append(self.shape[0])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "toarray", spy)
    original_getitem = Rows.__getitem__

    def counting(self: Rows, index: Any) -> np.ndarray:
        block = original_getitem(self, index)
        read.append(len(block))
        return block

    monkeypatch.setattr(Rows, "__getitem__", counting)
    data = load_data(path, model)
    assert data.digest == replace(data, array=values).digest
    result = evaluate(model, data, samples=2, batch_size=16)
    shuffled = np.random.default_rng(0).permutation(n)
    np.testing.assert_array_equal(data.array[shuffled[:16]], values[shuffled[:16]])
    assert result.points.elbo.shape == (n,)
    assert max(read) <= 16 and sum(read) >= 3 * n  # checks, digest and evaluation each read every row, in blocks
    if kind != "dense":
        assert made_dense and max(made_dense) <= 2 * 16 < n  # a span read for scattered rows is at most twice as long


def test_a_csc_matrix_larger_than_the_allowance_is_refused(files, model):
    with pytest.raises(DataError, match=r"CSC .* more than the 100 allowed \(max_data_size\); store it as CSR"):
        load_data(files["csc"], model, max_data_size=100)
    assert load_data(files["csr"], model, max_data_size=100).n == N  # CSR is read a block at a time: no limit applies


# ----------------------------------------------------------------- covariates from obs


def test_covariates_from_obs_without_the_models_categories(files, model):
    data = load_data(files["csr"], model, covariates=["batch", "size", "count", "flag", "donor"])
    found = data.covariates
    labels = np.array([BATCH_LABELS[i % 3] for i in range(N)])
    np.testing.assert_array_equal(found["batch"], [BATCH_LABELS.index(label) for label in labels])  # the categorical's own order
    assert found["batch"].dtype == np.int64
    np.testing.assert_array_equal(found["size"], np.linspace(1.0, 2.0, N))
    assert found["size"].dtype == np.float64
    np.testing.assert_array_equal(found["count"], np.arange(N) * 7)
    assert found["count"].dtype.kind == "i"
    np.testing.assert_array_equal(found["flag"], np.arange(N) % 2 == 0)
    assert found["flag"].dtype == np.bool_
    donors = [["d2", "d1", "d3"][i % 3] for i in range(N)]
    np.testing.assert_array_equal(found["donor"], [sorted({"d1", "d2", "d3"}).index(d) for d in donors])  # sorted strings
    assert found["donor"].dtype == np.int64
    assert read_covariates(files["dense"], ["batch"])["batch"].tolist() == found["batch"].tolist()
    tensors = data.covariates_of(np.array([0, 1, 2]))
    assert tensors["batch"].dtype == torch.int64 and tensors["flag"].dtype == torch.bool and tensors["size"].dtype == torch.float32


def test_covariates_coded_by_the_models_labels(tmp_path, model):
    obs = observations(N)
    obs["plate"] = pd.Categorical([10 + i % 2 for i in range(N)])  # numeric labels, compared as text
    path = write_h5ad(tmp_path / "cells.h5ad", X, obs=obs)
    knows = replace(model, categories={"batch": ("z", "c", "a", "b"), "donor": ("d3", "d2", "d1"), "plate": ("11", "10")})
    found = load_data(path, knows, covariates=["batch", "donor", "plate", "size"]).covariates
    batch = [BATCH_LABELS[i % 3] for i in range(N)]
    np.testing.assert_array_equal(found["batch"], [("z", "c", "a", "b").index(label) for label in batch])
    np.testing.assert_array_equal(found["donor"], [("d3", "d2", "d1").index(["d2", "d1", "d3"][i % 3]) for i in range(N)])
    np.testing.assert_array_equal(found["plate"], [1 - i % 2 for i in range(N)])
    assert found["size"].dtype == np.float64  # a numeric column the model has no labels for stays numeric
    own = load_data(path, model, covariates=["batch"])
    assert own.digest != load_data(path, knows, covariates=["batch"]).digest  # the codes are what is evaluated


def test_a_label_the_model_does_not_know_names_point_label_and_labels(files, model):
    knows = replace(model, categories={"batch": ("a", "b")})
    with pytest.raises(DataError) as caught:
        load_data(files["csr"], knows, covariates=["batch"])
    message = str(caught.value)
    assert "\n" not in message and str(files["csr"]) in message
    assert "covariate 'batch' of point 2 is 'c', a label the model does not know; it knows a, b" in message
    assert load_data(files["csr"], knows, covariates=["batch"], limit=2).covariates["batch"].tolist() == [1, 0]  # only those read


@pytest.mark.parametrize(
    ("column", "values", "phrase"),
    [
        ("batch", pd.Categorical(["a", None, "b", "a"]), "covariate 'batch' of point 1 is missing; every point needs a value"),
        ("size", np.array([1.0, 2.0, np.inf, 3.0]), "covariate 'size' of point 2 is inf; covariates must be finite"),
        ("phase", np.exp(1j * np.arange(4.0)), "obs column 'phase' holds complex128 values; a covariate is a number, a flag"),
    ],
)
def test_bad_covariate_values(tmp_path, model, column, values, phrase):
    obs = pd.DataFrame({column: values}, index=[f"c{i}" for i in range(4)])
    path = write_h5ad(tmp_path / "cells.h5ad", X[:4], obs=obs)
    with pytest.raises(DataError, match=phrase.replace("(", r"\(")):
        load_data(path, model, covariates=[column])


def test_a_missing_column_names_the_columns_obs_has(files, model):
    with pytest.raises(DataError, match=r"obs has no column 'nope' for covariates; it has batch, size, count, flag, donor"):
        load_data(files["csr"], model, covariates=["nope"])


# ----------------------------------------------------------------- the command line


@pytest.mark.parametrize("kind", FORMATS)
def test_elbo_gives_the_numbers_of_the_npy(files, kind):
    points, about = points_of(cli("elbo", files["model"], files[kind], "-k", "20", "--json"))
    npy_points, npy_about = points_of(cli("elbo", files["model"], files["x.npy"], "-k", "20", "--json"))
    assert points == npy_points and len(points) == N
    assert about["digest"] == npy_about["digest"] and about["shape"] == [N, D] and about["domain"] == npy_about["domain"]
    layered, about = points_of(cli("elbo", files["model"], files[kind], "--layer", "counts", "--limit", "9", "-k", "20", "--json"))
    npy_layered, npy_about = points_of(cli("elbo", files["model"], files["counts.npy"], "--limit", "9", "-k", "20", "--json"))
    assert layered == npy_layered and len(layered) == 9 and about["digest"] == npy_about["digest"]


def test_ais_and_compare_read_the_h5ad(files):
    options = ["--steps", "3", "--chains", "2", "-k", "2", "--limit", "6", "--json"]
    points, _ = points_of(cli("ais", files["model"], files["csc"], *options))
    assert points == points_of(cli("ais", files["model"], files["x.npy"], *options))[0]
    compared = cli("compare", files["model"], files["model"], files["csr"], "--layer", "counts", "-k", "4", "--json")
    assert compared.exit_code == 0, compared.stderr
    counts = points_of(cli("elbo", files["model"], files["counts.npy"], "-k", "4", "--json"))[1]
    assert json.loads(compared.stdout)["data"]["digest"] == counts["digest"]


CONDITIONAL = '''
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent, Normal


class Conditional(nn.Module):
    """A Bernoulli VAE whose encoder and decoder both see the cell's batch."""

    def __init__(self, dims=6, latent=2, batches=3):
        super().__init__()
        self.encoder = nn.Linear(dims, 2 * latent)
        self.decoder = nn.Linear(latent, dims)
        self.offsets = nn.Embedding(batches, dims)

    def encode(self, x, batch):
        mean, log_var = self.encoder(x + self.offsets(batch)).chunk(2, dim=-1)
        return Independent(Normal(mean, torch.exp(0.5 * log_var)), 1)

    def decode(self, z, batch):
        return Independent(Bernoulli(logits=self.decoder(z) + self.offsets(batch)), 1)
'''


@pytest.fixture(scope="module")
def conditional(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("conditional")
    (root / "models.py").write_text(CONDITIONAL)
    generator = torch.Generator().manual_seed(0)
    shapes = {"encoder.weight": (4, D), "encoder.bias": (4,), "decoder.weight": (D, 2), "decoder.bias": (D,), "offsets.weight": (3, D)}
    save_file({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}, root / "weights.safetensors")
    codes = np.array([i % 3 for i in range(N)])
    np.savez(root / "cells.npz", x=X, batch=codes)
    return {"weights": root / "weights.safetensors", "arch": Path(f"{root / 'models.py'}:Conditional"), "npz": root / "cells.npz"}


def test_obs_covariates_reach_an_arch_model_as_npz_arrays_do(files, conditional):
    common = ["--arch", conditional["arch"], "--covariates", "batch", "-k", "10", "--json"]
    points, about = points_of(cli("elbo", conditional["weights"], files["csr"], *common))
    npz_points, npz_about = points_of(cli("elbo", conditional["weights"], conditional["npz"], "--key", "x", *common))
    assert points == npz_points and about["digest"] == npz_about["digest"] and about["covariates"] == ["batch"]
    result = cli("elbo", conditional["weights"], files["csr"], *common[:3], "nope")
    assert_one_line_error(result, files["csr"], "obs has no column 'nope' for --covariates; it has batch, size")


def test_every_command_has_help_and_the_data_commands_take_layer():
    assert cli("--help").exit_code == 0
    for name, command in main.all_commands().items():
        result = cli(name, "--help")
        assert result.exit_code == 0, (name, result.stderr)
        takes_data = any(param.name == "key" for param in command.params)
        assert ("--layer NAME" in result.stdout) == takes_data, name


def test_the_command_line_starts_without_anndata():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vaeeval.cli; print(sorted({'anndata', 'h5py', 'pandas'} & set(sys.modules)))"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# ----------------------------------------------------------------- errors: one line, exit 2


def assert_one_line_error(result: Result, path: Path | None, *phrases: str) -> None:
    why = f"\nexit {result.exit_code}\nstdout {result.stdout!r}\nstderr {result.stderr!r}\nexception {result.exception!r}"
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), why
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("vaeeval: error: "), why
    assert "Traceback" not in result.stderr, why
    if path is not None:
        assert str(path) in result.stderr, why
    for phrase in phrases:
        assert phrase in result.stderr, f"lacks {phrase!r}" + why


def _edited(source: str, edit: Any) -> Any:
    """A copy of one of the good files with its HDF5 content changed by ``edit(file)``."""

    def make(files: dict[str, Path], root: Path) -> Path:
        path = root / "edited.h5ad"
        shutil.copy(files[source], path)
        with h5py.File(path, "r+") as handle:
            edit(handle)
        return path

    return make


def _replace(name: str, value: Any) -> Any:
    def edit(handle: Any) -> None:
        del handle[name]
        handle[name] = value

    return edit


def _truncated(files: dict[str, Path], root: Path) -> Path:
    path = root / "truncated.h5ad"
    path.write_bytes(files["csr"].read_bytes()[:3000])
    return path


def _plain_hdf5(files: dict[str, Path], root: Path) -> Path:
    path = root / "plain.h5"
    with h5py.File(path, "w") as handle:
        handle["values"] = X
    return path


def _written(matrix: Any, **options: Any) -> Any:
    def make(files: dict[str, Path], root: Path) -> Path:
        return write_h5ad(root / "written.h5ad", matrix, **options)

    return make


def _with_value(value: float) -> Any:
    changed = X.copy()
    changed[3, 2] = value
    return _written(sparse.csr_matrix(changed))


def _npz(files: dict[str, Path], root: Path) -> Path:
    np.savez(root / "x.npz", x=X)
    return root / "x.npz"


def _decreasing_indptr(handle: Any) -> None:
    pointers = handle["X/indptr"][...]
    pointers[3] = pointers[-1] + 5
    _replace("X/indptr", pointers)(handle)


def _column_out_of_range(handle: Any) -> None:
    indices = handle["X/indices"][...]
    indices[0] = 99
    _replace("X/indices", indices)(handle)


ERRORS = [
    ("truncated", _truncated, [], ["truncated or corrupt .h5ad"]),
    ("HDF5 but not AnnData", _plain_hdf5, [], ["an HDF5 file, but not AnnData (.h5ad): it has no obs data frame"]),
    ("no obs index", _edited("csr", lambda handle: handle["obs"].__delitem__("_index")), [], ["obs has no index"]),
    ("X without indptr", _edited("csr", lambda handle: handle["X"].__delitem__("indptr")), [],
     ["X is a csr_matrix without its 'indptr' array"]),
    ("indptr decreasing", _edited("csr", _decreasing_indptr), [], ["X: its indptr is not a non-decreasing run of offsets"]),
    ("column index out of range", _edited("csr", _column_out_of_range), [], ["column index is 99, outside 0 to 5"]),
    ("CSC row index out of range", _edited("csc", _column_out_of_range), [], ["row index is 99, outside 0 to 39"]),
    ("X of strings", _edited("dense", _replace("X", np.array([["a"] * D] * N, dtype="S1"))), [], ["X holds |S1 values"]),
    ("X of one axis", _edited("dense", _replace("X", np.zeros(N))), [], ["X has shape [40]"]),
    ("rows unlike obs", _edited("dense", _replace("obs/_index", np.array([f"c{i}" for i in range(30)], dtype="S"))), [],
     ["X has 40 rows and obs 30"]),
    ("an awkward element", _edited("csr", lambda handle: handle["X"].attrs.__setitem__("encoding-type", "awkward-array")), [],
     ["X is a awkward-array element; vaeeval reads a dense array or a CSR or CSC sparse matrix"]),
    ("no X", _edited("csr", lambda handle: handle.__delitem__("X")), [],
     ["has no X matrix; it holds no X and the layers counts: choose one with --layer"]),
    ("wrong shape", _written(sparse.csr_matrix(binary(N, 0, dims=5))), [], ["data has shape [40, 5]; the model needs [N, 6]"]),
    ("no points", _written(sparse.csr_matrix((0, D), dtype=np.float32)), [], ["holds no data points"]),
    ("not finite", _with_value(np.nan), [], ["point 3, element [2] is nan; data must be finite"]),
    ("outside the support", _with_value(2.0), [], [
        "point 3, element [2] is 2: the values span [0, 2], outside the model's [0, 1] (the bernoulli likelihood scores exactly 0 or 1)"
    ]),
    ("a layer it lacks", lambda files, root: files["csr"], ["--layer", "raw"],
     ["has no layer 'raw'; it holds X and the layers counts: choose one with --layer"]),
    ("--key", lambda files, root: files["dense"], ["--key", "x"], ["--key selects an array of an .npz file; an .h5ad holds X and layers"]),
    ("--layer with .npy", lambda files, root: files["x.npy"], ["--layer", "counts"],
     ["--layer selects a layer of an .h5ad (AnnData) file, and this is not one"]),
    ("--layer with .npz", _npz, ["--layer", "counts"], ["--layer selects a layer of an .h5ad (AnnData) file, and this is not one"]),
    ("CSC beyond --max-data-size", lambda files, root: files["csc"], ["--max-data-size", "100"],
     ["CSC (column by column) sparse matrix", "more than the 100 allowed (--max-data-size)"]),
]


@pytest.mark.parametrize(("case", "make", "args", "phrases"), ERRORS, ids=[case[0] for case in ERRORS])
def test_bad_h5ad_is_one_line_exit_2(tmp_path, files, case, make, args, phrases):
    path = make(files, tmp_path)
    assert_one_line_error(cli("elbo", files["model"], path, "-k", "2", *args), path, *phrases)


def test_the_model_records_a_layer_the_file_lacks(files, model):
    with pytest.raises(DataError, match=r"has no layer 'spliced' \(the layer the model records\); it holds X and the layers counts"):
        load_data(files["csr"], replace(model, data_layer="spliced"))


def test_without_anndata_an_h5ad_is_refused_in_one_line(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata now raises ImportError
    result = cli("elbo", files["model"], files["csr"], "-k", "2")
    assert_one_line_error(result, files["csr"], ANNDATA_MISSING)
    assert result.stderr == f"vaeeval: error: {files['csr']}: reading .h5ad files needs the anndata extra: pip install 'vaeeval[anndata]'\n"
    assert cli("elbo", files["model"], files["x.npy"], "-k", "2").exit_code == 0  # other data needs no anndata
