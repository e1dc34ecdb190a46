"""The CLI's bad-input contract: exit code 2, one line on stderr, nothing on stdout.

Every bad input -- a model file, a data file or an option -- must end with
exit code 2 and exactly one line ``vaeeval: error: <message>`` on stderr that
names the offending file and the problem; never a traceback, never a number on
stdout. The good-input tests at the bottom make sure the fixtures the broken
files are derived from are themselves valid, so every failure above is caused
by the one thing each case breaks.
"""

from __future__ import annotations

import ast
import json
import pickle
import re
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file
from torch import nn

from vaeeval import VaeevalError, evaluate, load_data, load_model, save_model
from vaeeval.cli import main
from vaeeval.format.likelihoods import likelihood_spec

ERROR_PREFIX = "vaeeval: error: "
D = 6  # data dimensions of the small test models
N = 8  # data points in the good data file


# ----------------------------------------------------------------- helpers


def run(*args: Any) -> Result:
    """Invoke the CLI in-process with separate stdout and stderr (click >= 8.2).

    Python warnings are recorded as ``result.warnings``: pytest intercepts them, but
    in a real run each one is printed to stderr, so the contract counts them as output.
    The categories Python hides by default (and the ResourceWarnings of files leaked
    by earlier tests, which the garbage collector reports at random later times) are
    left out.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        result = CliRunner().invoke(main, [str(a) for a in args])
    result.warnings = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught]
    return result


def _explain(result: Result) -> str:
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    tb = "".join(traceback.format_exception(*result.exc_info)) if escaped else ""
    return (
        f"\nexit code: {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
        f"\nwarnings (printed to stderr in a real run): {getattr(result, 'warnings', [])!r}"
        f"\nexception: {result.exception!r}\n{tb}"
    )


def assert_one_line_error(result: Result, path: Path | str | None, *phrases: str) -> str:
    """The contract for every bad input; returns the message (without the prefix)."""
    why = _explain(result)
    assert isinstance(result.exception, SystemExit), "an exception other than SystemExit escaped" + why
    assert result.exit_code == 2, why
    assert result.stdout == "", "something was printed on stdout" + why
    assert result.stderr.count("\n") == 1, "stderr is not exactly one line" + why
    assert not result.warnings, "Python warnings would add lines to stderr" + why
    assert result.stderr.endswith("\n"), why
    line = result.stderr[:-1]
    assert line.startswith(ERROR_PREFIX), why
    assert "Traceback" not in line, why
    if path is not None:
        assert str(path) in line, f"the message does not name the file {str(path)!r}" + why
    for phrase in phrases:
        assert phrase in line, f"the message lacks {phrase!r}" + why
    return line[len(ERROR_PREFIX) :]


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the vaeeval document of a model file."""
    with safetensors.safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        document = json.loads(handle.metadata()["vaeeval"])
    return tensors, document


def write_model_file(path: Path, tensors: dict[str, torch.Tensor], document: Any) -> Path:
    """A safetensors file with ``document`` as its vaeeval metadata (any JSON value)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"vaeeval": json.dumps(document)})
    return path


def _mlp(likelihood: dict[str, Any], data: dict[str, Any] | None, path: Path, p: int = 1) -> Path:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 4))
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, p * D))
    save_model(path, encoder, decoder, likelihood=likelihood, input_shape=[D], latent_dim=2, data=data)
    return path


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Valid models and data, written once for the module (tests never modify them)."""
    root = tmp_path_factory.mktemp("good")
    out = {
        "bernoulli": _mlp({"family": "bernoulli"}, {"domain": "binary"}, root / "bernoulli.safetensors"),
        "gaussian": _mlp({"family": "gaussian", "sigma": 0.5}, None, root / "gaussian.safetensors"),
        "discrete5": _mlp(
            {"family": "gaussian", "sigma": 0.5}, {"domain": "discrete", "levels": 5}, root / "discrete5.safetensors"
        ),
        "unit": _mlp({"family": "gaussian", "sigma": 0.5}, {"domain": "unit_interval"}, root / "unit.safetensors"),
    }
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 4))
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, D), nn.Unflatten(1, (1, 2, 3)))
    out["image"] = root / "image.safetensors"
    save_model(out["image"], encoder, decoder, likelihood={"family": "bernoulli"}, input_shape=[1, 2, 3], latent_dim=2,
               data={"domain": "binary"})
    rng = np.random.default_rng(0)
    out["binary_data"] = root / "binary.npy"
    np.save(out["binary_data"], (rng.random((N, D)) < 0.5).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def base(files: dict[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The bernoulli model's tensors and document, to be copied and broken."""
    return read_model_file(files["bernoulli"])


# ----------------------------------------------------------------- broken model files
#
# Each breaker gets (directory, tensors, document) -- fresh copies it may edit --
# and returns the path of the broken model file it wrote there.

Breaker = Callable[[Path, dict[str, torch.Tensor], dict[str, Any]], Path]


def edit_doc(change: Callable[[dict[str, Any]], Any]) -> Breaker:
    def breaker(root: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
        change(doc)
        return write_model_file(root / "broken.safetensors", tensors, doc)

    return breaker


def edit_tensors(change: Callable[[dict[str, torch.Tensor]], Any]) -> Breaker:
    def breaker(root: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
        change(tensors)
        return write_model_file(root / "broken.safetensors", tensors, doc)

    return breaker


def edit_both(change: Callable[[dict[str, torch.Tensor], dict[str, Any]], Any]) -> Breaker:
    def breaker(root: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
        change(tensors, doc)
        return write_model_file(root / "broken.safetensors", tensors, doc)

    return breaker


def raw_file(content: bytes, name: str = "broken.safetensors") -> Breaker:
    def breaker(root: Path, tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> Path:
        (root / name).write_bytes(content)
        return root / name

    return breaker


def _missing(root: Path, tensors, doc) -> Path:
    return root / "no_such_model.safetensors"


def _directory(root: Path, tensors, doc) -> Path:
    (root / "adir.safetensors").mkdir()
    return root / "adir.safetensors"


def _truncated(cut: int | None = None, keep: int | None = None) -> Breaker:
    def breaker(root: Path, tensors, doc) -> Path:
        good = write_model_file(root / "good.safetensors", tensors, doc).read_bytes()
        path = root / "broken.safetensors"
        path.write_bytes(good[:-cut] if cut is not None else good[:keep])
        return path

    return breaker


def _bad_header_json(root: Path, tensors, doc) -> Path:
    header = b"{this is not json}"
    path = root / "broken.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


def _no_metadata(root: Path, tensors, doc) -> Path:
    path = root / "plain.safetensors"
    save_file(tensors, str(path))
    return path


def _other_metadata(root: Path, tensors, doc) -> Path:
    path = root / "plain.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _raw_metadata(text: str) -> Breaker:
    def breaker(root: Path, tensors, doc) -> Path:
        path = root / "broken.safetensors"
        save_file(tensors, str(path), metadata={"vaeeval": text})
        return path

    return breaker


def _torch_zip(root: Path, tensors, doc) -> Path:
    path = root / "checkpoint.pt"
    torch.save(tensors, path)
    return path


def _torch_legacy_pickle(root: Path, tensors, doc) -> Path:
    path = root / "checkpoint.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    return path


def _npy_as_model(root: Path, tensors, doc) -> Path:
    path = root / "weights.npy"
    np.save(path, np.zeros((3, 4), dtype=np.float32))
    return path


def _random_bytes(root: Path, tensors, doc) -> Path:
    content = np.random.default_rng(0).bytes(1000)
    assert content[:1] not in (b"\x80", b"P", b"\x93", b"{")
    path = root / "random.safetensors"
    path.write_bytes(content)
    return path


def _double_space_dir(root: Path, tensors, doc) -> Path:
    # A perfectly legal path; the message must still name it exactly.
    folder = root / "my  models"
    folder.mkdir()
    return write_model_file(folder / "m.safetensors", tensors, {**doc, "format": 2})


def _pop(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda doc: doc.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda doc: doc.__setitem__(key, value)


def _shape_mismatch(tensors: dict[str, torch.Tensor]) -> None:
    tensors["decoder.2.weight"] = torch.zeros(D, 15)


def _decoder_too_wide(tensors: dict[str, torch.Tensor]) -> None:
    tensors["decoder.2.weight"] = torch.zeros(D + 1, 16)
    tensors["decoder.2.bias"] = torch.zeros(D + 1)


def _encoder_too_wide(tensors: dict[str, torch.Tensor]) -> None:
    tensors["encoder.2.weight"] = torch.zeros(5, 16)
    tensors["encoder.2.bias"] = torch.zeros(5)


def _unknown_layer(doc: dict[str, Any]) -> None:
    doc["encoder"][1] = {"type": "maxpool"}


def _unknown_layer_key(doc: dict[str, Any]) -> None:
    doc["encoder"][1] = {"type": "tanh", "inplace": True}


def _missing_layer_tensor(doc: dict[str, Any]) -> None:
    doc["encoder"][0]["tensor"] = "encoder.9"


def _both_sigmas(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    tensors["likelihood.log_sigma"] = torch.zeros(D)
    doc["likelihood"] = {"family": "gaussian", "sigma": 0.5, "log_sigma": "likelihood.log_sigma"}


def _log_sigma_shape(tensors: dict[str, torch.Tensor], doc: dict[str, Any]) -> None:
    tensors["likelihood.log_sigma"] = torch.zeros(D - 1)
    doc["likelihood"] = {"family": "gaussian", "log_sigma": "likelihood.log_sigma"}


MODEL_CASES: list[tuple[str, Breaker, tuple[str, ...]]] = [
    # -- the file itself
    ("missing", _missing, ("no such file",)),
    ("directory", _directory, ("is a directory",)),
    ("random-bytes", _random_bytes, ("not a safetensors file",)),
    ("empty", raw_file(b""), ("not a safetensors file", "0 bytes")),
    ("three-bytes", raw_file(b"abc"), ("not a safetensors file", "3 bytes")),
    ("truncated-data", _truncated(cut=100), ("truncated",)),
    ("truncated-header", _truncated(keep=40), ("truncated", "header")),
    ("header-not-json", _bad_header_json, ("not a safetensors file", "not JSON")),
    ("torch-save-zip", _torch_zip, ("not a safetensors file", "never unpickles")),
    ("torch-save-legacy-pickle", _torch_legacy_pickle, ("pickle", "not a safetensors file", "never unpickles")),
    ("npy-as-model", _npy_as_model, (".npy", "not a safetensors model file")),
    ("double-space-in-path", _double_space_dir, ("format 2 is not supported",)),
    # -- the metadata
    ("no-metadata", _no_metadata, ("without vaeeval metadata",)),
    ("other-metadata-only", _other_metadata, ("without vaeeval metadata",)),
    ("metadata-not-json", _raw_metadata("{not json"), ("not valid JSON",)),
    ("metadata-a-list", _raw_metadata("[1, 2]"), ("must be a JSON object",)),
    ("format-2", edit_doc(_set("format", 2)), ("format 2 is not supported", "format 1")),
    ("format-string", edit_doc(_set("format", "1")), ("format '1' is not supported",)),
    ("format-true", edit_doc(_set("format", True)), ("format True is not supported",)),
    ("format-missing", edit_doc(_pop("format")), ('no "format" key',)),
    ("input-shape-missing", edit_doc(_pop("input_shape")), ('"input_shape" must be a non-empty list',)),
    ("latent-dim-zero", edit_doc(_set("latent_dim", 0)), ('"latent_dim" must be a positive integer', "0")),
    ("encoder-empty", edit_doc(_set("encoder", [])), ('"encoder" must be a non-empty list',)),
    ("decoder-missing", edit_doc(_pop("decoder")), ('"decoder" must be a non-empty list',)),
    # -- layers and tensors
    (
        "layer-names-missing-tensor",
        edit_doc(_missing_layer_tensor),
        ('encoder layer 0 (linear "encoder.9")', "'encoder.9.weight'", "does not have"),
    ),
    # (named "unused" so that the file's header length does not end in byte 0x80; see
    # test_valid_model_whose_header_length_looks_like_a_magic_number)
    ("unused-tensor", edit_tensors(lambda t: t.__setitem__("unused", torch.zeros(3))),
     ("not used by any layer", "'unused'")),
    (
        "shapes-do-not-chain",
        edit_tensors(_shape_mismatch),
        ('decoder layer 2 (linear "decoder.2")', "[6, 15]", "[16]"),
    ),
    (
        "bias-wrong-shape",
        edit_tensors(lambda t: t.__setitem__("encoder.0.bias", torch.zeros(15))),
        ('encoder layer 0 (linear "encoder.0")', "encoder.0.bias is [15]", "[16]"),
    ),
    ("encoder-output-vs-latent-dim", edit_doc(_set("latent_dim", 3)), ("encoder gives [4]", "latent_dim 3", "[6]")),
    ("encoder-output-too-wide", edit_tensors(_encoder_too_wide), ("encoder gives [5]", "latent_dim 2", "[4]")),
    ("decoder-output-not-PxD", edit_tensors(_decoder_too_wide), ("decoder gives [7]", "P x D = 1 x 6 = 6")),
    (
        "decoder-output-not-PxD-gaussian-P2",
        edit_doc(_set("likelihood", {"family": "gaussian"})),
        ("decoder gives [6]", "gaussian", "P x D = 2 x 6 = 12"),
    ),
    ("unknown-layer-type", edit_doc(_unknown_layer), ("encoder layer 1", "unknown layer type 'maxpool'")),
    ("unknown-layer-key", edit_doc(_unknown_layer_key), ("encoder layer 1 (tanh)", "unknown key(s) inplace")),
    ("integer-tensor", edit_tensors(lambda t: t.__setitem__("encoder.0.bias", torch.zeros(16, dtype=torch.int32))),
     ("'encoder.0.bias'", "int32", "floating point")),
    # -- likelihood, prior, data blocks
    ("unknown-likelihood-family", edit_doc(_set("likelihood", {"family": "weibull"})),
     ("likelihood family 'weibull' is not supported",)),
    ("likelihood-missing", edit_doc(_pop("likelihood")), ('likelihood must be an object with a string "family"',)),
    ("likelihood-unknown-key", edit_doc(_set("likelihood", {"family": "bernoulli", "levels": 3})),
     ("unknown key(s) levels",)),
    ("gaussian-sigma-and-log-sigma", edit_both(_both_sigmas), ("sigma or log_sigma, not both",)),
    ("log-sigma-wrong-shape", edit_both(_log_sigma_shape), ("'likelihood.log_sigma' is [5]", "expected [] or [6]")),
    ("log-sigma-missing-tensor", edit_doc(_set("likelihood", {"family": "gaussian", "log_sigma": "nope"})),
     ("log_sigma names tensor 'nope'", "does not have")),
    ("sigma-negative", edit_doc(_set("likelihood", {"family": "gaussian", "sigma": -1})),
     ("sigma must be a positive finite number", "-1")),
    ("unknown-prior-family", edit_doc(_set("prior", {"family": "vamp"})), ("prior family 'vamp' is not supported",)),
    ("unknown-data-domain", edit_doc(_set("data", {"domain": "pixels"})), ("data domain 'pixels' is not one of",)),
    ("discrete-without-levels", edit_doc(_set("data", {"domain": "discrete"})), ('"discrete" needs "levels"',)),
]


def _model_case_ids() -> list[str]:
    return [case[0] for case in MODEL_CASES]


@pytest.mark.parametrize("command", ["inspect", "elbo"])
@pytest.mark.parametrize(("name", "breaker", "phrases"), MODEL_CASES, ids=_model_case_ids())
def test_bad_model_file(tmp_path, files, base, command, name, breaker, phrases):
    tensors = {k: v.clone() for k, v in base[0].items()}
    document = json.loads(json.dumps(base[1]))
    model = breaker(tmp_path, tensors, document)
    args = ["inspect", model] if command == "inspect" else ["elbo", model, files["binary_data"], "-k", "4"]
    assert_one_line_error(run(*args), model, *phrases)


@pytest.mark.parametrize("magic", [b"\x80", b"PK"], ids=["0x80-like-a-pickle", "PK-like-a-zip"])
def test_valid_model_whose_header_length_looks_like_a_magic_number(tmp_path, base, magic):
    """A safetensors file starts with its header length (u64, little-endian), so a valid
    file can begin with any bytes: a header of 0x480 bytes starts with b"\x80\x04", one of
    0x4B50 bytes with b"PK". Such a file is a valid model and must load."""
    tensors, document = base
    wanted = int.from_bytes(magic, "little")
    modulus = 256 ** len(magic)
    path = tmp_path / "m.safetensors"
    write_model_file(path, tensors, {**document, "description": ""})
    first_guess = (wanted - int.from_bytes(path.read_bytes()[:8], "little")) % modulus
    for pad in range(max(0, first_guess - 16), first_guess + 16):
        write_model_file(path, tensors, {**document, "description": "x" * pad})
        if path.read_bytes()[: len(magic)] == magic:
            break
    else:
        pytest.fail("could not make a header of the wanted length")
    assert int.from_bytes(path.read_bytes()[:8], "little") % modulus == wanted
    _assert_ok(run("inspect", path))


# ----------------------------------------------------------------- bad data files
#
# Each maker gets the directory and returns (model key in ``files``, data path, extra CLI args).

DataMaker = Callable[[Path], tuple[str, Path, list[str]]]


def npy(model: str, array: Any, *extra: str, name: str = "data.npy", **save: Any) -> DataMaker:
    def maker(root: Path) -> tuple[str, Path, list[str]]:
        path = root / name
        np.save(path, array() if callable(array) else array, **save)
        return model, path, list(extra)

    return maker


def npz(model: str, arrays: dict[str, Any], *extra: str) -> DataMaker:
    def maker(root: Path) -> tuple[str, Path, list[str]]:
        path = root / "data.npz"
        np.savez(path, **arrays)
        return model, path, list(extra)

    return maker


def raw_data(content: bytes, name: str = "data.npy") -> DataMaker:
    def maker(root: Path) -> tuple[str, Path, list[str]]:
        (root / name).write_bytes(content)
        return "bernoulli", root / name, []

    return maker


def binary(**bad: Any) -> np.ndarray:
    """Good binary [N, D] data with the cells named like ``p1_e4=0.5`` set."""
    x = (np.random.default_rng(1).random((N, D)) < 0.5).astype(np.float32)
    for cell, value in bad.items():
        point, element = (int(part[1:]) for part in cell.split("_"))
        x[point, element] = value
    return x


def _missing_data(root: Path) -> tuple[str, Path, list[str]]:
    return "bernoulli", root / "no_such_data.npy", []


def _data_directory(root: Path) -> tuple[str, Path, list[str]]:
    (root / "adir.npy").mkdir()
    return "bernoulli", root / "adir.npy", []


def _pickled_data(protocol: int) -> DataMaker:
    def maker(root: Path) -> tuple[str, Path, list[str]]:
        path = root / "data.pkl"
        with path.open("wb") as handle:
            pickle.dump(binary(), handle, protocol=protocol)
        return "bernoulli", path, []

    return maker


def _truncated_data(suffix: str) -> DataMaker:
    def maker(root: Path) -> tuple[str, Path, list[str]]:
        path = root / f"data{suffix}"
        if suffix == ".npy":
            np.save(path, binary())
        else:
            np.savez(path, x=binary())
        path.write_bytes(path.read_bytes()[:-100])
        return "bernoulli", path, []

    return maker


def _model_as_data(root: Path) -> tuple[str, Path, list[str]]:
    path = root / "other.safetensors"
    _mlp({"family": "bernoulli"}, None, path)
    return "bernoulli", path, []


def _object_array() -> np.ndarray:
    array = np.empty((N, D), dtype=object)
    array[:] = 0.0
    return array


DATA_CASES: list[tuple[str, DataMaker, tuple[str, ...]]] = [
    # -- the file itself
    ("missing", _missing_data, ("no such file",)),
    ("directory", _data_directory, ("holds no PNG or JPEG images",)),
    ("pickle", _pickled_data(pickle.HIGHEST_PROTOCOL), ("pickle", "never unpickles")),
    ("pickle-protocol-0", _pickled_data(0), ("not a .npy or .npz file",)),
    ("random-bytes", raw_data(np.random.default_rng(2).bytes(500)), ("not a .npy or .npz file",)),
    ("empty-file", raw_data(b""), ("not a .npy or .npz file",)),
    ("model-file-as-data", _model_as_data, ("not a .npy or .npz file",)),
    ("truncated-npy", _truncated_data(".npy"), ("truncated or corrupt",)),
    ("truncated-npz", _truncated_data(".npz"), ("truncated or corrupt",)),
    ("object-dtype-npy", npy("bernoulli", _object_array, allow_pickle=True), ("dtype object", "never unpickles")),
    ("object-dtype-npz", npz("bernoulli", {"x": _object_array()}), ("dtype object", "never unpickles")),
    ("string-dtype-npy", npy("bernoulli", np.full((N, D), "0")), ("<U1", "numeric")),
    ("complex-dtype-npy", npy("bernoulli", np.zeros((N, D), np.complex64)), ("complex64", "numeric")),
    # -- npz keys
    ("npz-two-arrays-no-key", npz("bernoulli", {"train": binary(), "test": binary()}),
     ("several arrays", "train", "test", "--key")),
    ("npz-key-missing", npz("bernoulli", {"train": binary(), "test": binary()}, "--key", "valid"),
     ("no array 'valid'", "train, test")),
    ("npz-no-arrays", npz("bernoulli", {}), ("no arrays",)),
    ("key-on-npy", npy("bernoulli", binary(), "--key", "x"), ("--key", "not one")),
    # -- shape
    ("wrong-shape", npy("bernoulli", np.zeros((N, 7), np.float32)), ("[8, 7]", "[N, 6]")),
    ("wrong-rank", npy("bernoulli", np.zeros((N, 2, 3), np.float32)), ("[8, 2, 3]", "[N, 6]")),
    ("one-dimensional", npy("bernoulli", np.zeros(D, np.float32)), ("[6]", "[N, 6]")),
    ("wrong-shape-image-model", npy("image", np.zeros((N, 5), np.float32)), ("[8, 5]", "[N, 1, 2, 3]", "[N, 6]")),
    ("no-points", npy("bernoulli", np.zeros((0, D), np.float32)), ("no data points",)),
    # -- values
    ("nan", npy("gaussian", binary(p3_e2=np.nan)), ("point 3", "element [2]", "nan", "finite")),
    ("inf", npy("gaussian", binary(p5_e0=np.inf)), ("point 5", "element [0]", "inf", "finite")),
    ("minus-inf", npy("bernoulli", binary(p0_e5=-np.inf)), ("point 0", "element [5]", "-inf", "finite")),
    ("nan-image-element-index", npy("image", binary(p2_e5=np.nan)), ("point 2", "element [0, 1, 2]", "nan")),
    ("bernoulli-half", npy("bernoulli", binary(p1_e4=0.5)),
     ("point 1", "element [4]", "0.5", "exactly 0 or 1")),
    ("bernoulli-integer-2", npy("bernoulli", binary().astype(np.int64) * 2), ("point ", "is 2", "exactly 0 or 1")),
    ("discrete-5-levels-0.3", npy("discrete5", binary(p4_e1=0.3)),
     ("point 4", "element [1]", "0.3", "discrete data on 5 levels")),
    ("unit-interval-1.5", npy("unit", binary(p6_e3=1.5)), ("point 6", "element [3]", "1.5", "[0, 1]")),
]


@pytest.mark.parametrize(("name", "maker", "phrases"), DATA_CASES, ids=[case[0] for case in DATA_CASES])
def test_bad_data_file(tmp_path, files, name, maker, phrases):
    model, data, extra = maker(tmp_path)
    assert_one_line_error(run("elbo", files[model], data, "-k", "4", *extra), data, *phrases)


# ----------------------------------------------------------------- bad options

OPTION_CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("k-zero", ["-k", "0"], ("--samples", "0")),
    ("samples-abc", ["--samples", "abc"], ("--samples", "'abc'")),
    ("limit-zero", ["--limit", "0"], ("--limit",)),
    ("batch-size-zero", ["--batch-size", "0"], ("--batch-size",)),
    ("seed-negative", ["--seed", "-1"], ("--seed",)),
    ("max-memory-abc", ["--max-memory", "lots"], ("--max-memory", "'lots'")),
    ("unknown-option", ["--nope"], ("--nope",)),
    ("device-bogus", ["--device", "bogus"], ("--device", "bogus")),
]


@pytest.mark.parametrize(("name", "extra", "phrases"), OPTION_CASES, ids=[case[0] for case in OPTION_CASES])
def test_bad_option(files, name, extra, phrases):
    assert_one_line_error(run("elbo", files["bernoulli"], files["binary_data"], *extra), None, *phrases)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(files):
    result = run("elbo", files["bernoulli"], files["binary_data"], "-k", "4", "--device", "cuda")
    assert_one_line_error(result, None, "--device cuda", "no CUDA device")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [(["elbo", "MODEL"], "Missing argument 'DATA'"), (["evaluate"], "No such command 'evaluate'")],
    ids=["missing-data-argument", "unknown-command"],
)
def test_usage_errors(files, args, phrase):
    args = [files["bernoulli"] if a == "MODEL" else a for a in args]
    assert_one_line_error(run(*args), None, phrase)


# ----------------------------------------------------------------- good inputs


def _assert_ok(result: Result) -> None:
    assert result.exit_code == 0, _explain(result)
    assert result.exception is None, _explain(result)
    assert not result.warnings, "Python warnings would be printed to stderr" + _explain(result)
    assert result.stdout


def test_fixtures_are_valid(files):
    """The models the broken files derive from load and evaluate."""
    for model in ("bernoulli", "gaussian", "discrete5", "unit", "image"):
        _assert_ok(run("inspect", files[model]))
    _assert_ok(run("elbo", files["bernoulli"], files["binary_data"], "-k", "4"))


def test_gaussian_on_any_finite_data(tmp_path, files):
    rng = np.random.default_rng(3)
    data = rng.normal(scale=10.0, size=(N, D)).astype(np.float32)
    data[0] = [-1e3, 1e3, 0.0, -0.0, 1e-30, 123.456]
    path = tmp_path / "real.npy"
    np.save(path, data)
    result = run("elbo", files["gaussian"], path, "-k", "4", "--json")
    _assert_ok(result)
    document = json.loads(result.stdout)
    assert isinstance(document, dict)


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        (np.float32, 1e19),
        (np.float32, 1e20),
        (np.float32, -1e30),
        (np.float32, float(np.finfo(np.float32).max)),
        (np.float64, 1e20),
        (np.float64, 5e-324),
    ],
    ids=["f32-1e19", "f32-1e20", "f32-minus-1e30", "f32-max", "f64-1e20", "f64-subnormal"],
)
def test_gaussian_on_extreme_finite_data(tmp_path, files, dtype, value):
    """Finite data (within float32's range, which vaeeval computes in) is valid for a
    gaussian likelihood however large: its log-density, about -2 * value**2 nats here,
    is a finite float64."""
    data = np.zeros((N, D), dtype=dtype)
    data[1, 2] = value
    path = tmp_path / "extreme.npy"
    np.save(path, data)
    result = run("elbo", files["gaussian"], path, "-k", "4", "--json")
    _assert_ok(result)
    assert json.loads(result.stdout)


@pytest.mark.parametrize("value", [1e300, -1e300, 1e39], ids=["1e300", "minus-1e300", "1e39"])
def test_gaussian_on_float64_data_beyond_float32(tmp_path, files, value):
    """Finite float64 data that float32 cannot hold: either scored, or refused by the
    one-line contract naming the data file -- never a warning, a traceback or a
    message blaming the model."""
    data = np.zeros((N, D), dtype=np.float64)
    data[1, 2] = value
    path = tmp_path / "huge.npy"
    np.save(path, data)
    result = run("elbo", files["gaussian"], path, "-k", "4", "--json")
    if result.exit_code == 0:
        _assert_ok(result)
    else:
        assert_one_line_error(result, path, "point 1", "element [2]")


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_])
def test_bernoulli_accepts_binary_data_of_any_numeric_dtype(tmp_path, files, dtype):
    path = tmp_path / "data.npy"
    np.save(path, binary().astype(dtype))
    _assert_ok(run("elbo", files["bernoulli"], path, "-k", "4"))


def test_discrete_model_accepts_grid_values(tmp_path, files):
    path = tmp_path / "grid.npy"
    np.save(path, (np.random.default_rng(4).integers(0, 5, (N, D)) / 4).astype(np.float32))
    _assert_ok(run("elbo", files["discrete5"], path, "-k", "4"))


@pytest.mark.parametrize("shape", [(N, D), (N, 1, 2, 3)], ids=["flat-N-D", "N-1-2-3"])
def test_image_model_takes_flat_or_shaped_data(tmp_path, files, shape):
    path = tmp_path / "data.npy"
    np.save(path, binary().reshape(shape))
    _assert_ok(run("elbo", files["image"], path, "-k", "4"))


def test_npz_with_key(tmp_path, files):
    path = tmp_path / "data.npz"
    np.savez(path, train=binary(p0_e0=0.5), test=binary())
    _assert_ok(run("elbo", files["bernoulli"], path, "-k", "4", "--key", "test"))


def test_limit_skips_bad_points_after_it(tmp_path, files):
    path = tmp_path / "data.npy"
    np.save(path, binary(p7_e0=0.5))
    _assert_ok(run("elbo", files["bernoulli"], path, "-k", "4", "--limit", "7"))
    assert_one_line_error(run("elbo", files["bernoulli"], path, "-k", "4", "--limit", "8"), path, "point 7")


# ----------------------------------------------------------------- parameter names and flags
#
# The library names a parameter as its caller wrote it (``device``); the command line
# renders the same message with the flag a user typed (``--device``).

MARK = "\x00"  # how vaeeval.errors.option marks a parameter inside a message
ROOT = Path(__file__).resolve().parents[1]
LIBRARY_ONLY = {"chunk_size"}  # parameters of the library the command line does not offer


def _library_error(call: Callable[[], Any]) -> VaeevalError:
    with pytest.raises(VaeevalError) as caught:
        call()
    return caught.value


NAMED = [
    ("device", ["--device", "tpu"], lambda model, data: evaluate(model, data, samples=4, device="tpu"),
     "device 'tpu' is not a device name", "--device 'tpu' is not a device name"),
    ("log_sigma_tensor", ["--arch", "vae.py:VAE", "--likelihood", "bernoulli", "--log-sigma-tensor", "x"],
     lambda model, data: likelihood_spec("bernoulli", log_sigma_tensor="x"),
     "log_sigma_tensor does not apply to a bernoulli likelihood", "--log-sigma-tensor does not apply to a bernoulli likelihood"),
    ("discretize-density", ["--discretize", "5", "--density"],
     lambda model, data: evaluate(model, data, samples=4, discretize=5, density=True),
     "discretize and density contradict each other", "--discretize and --density contradict each other"),
]


@pytest.mark.parametrize(("name", "flags", "call", "library", "command_line"), NAMED, ids=[case[0] for case in NAMED])
def test_the_library_names_the_parameter_and_the_cli_its_flag(files, name, flags, call, library, command_line):
    model = load_model(files["bernoulli"])
    error = _library_error(lambda: call(model, load_data(files["binary_data"], model)))
    assert str(error).startswith(library) and "--" not in str(error) and MARK not in str(error)
    message = assert_one_line_error(run("elbo", files["bernoulli"], files["binary_data"], "-k", "4", *flags), None)
    assert message.startswith(command_line) and MARK not in message


def test_a_parameter_whose_flag_is_not_its_name(files):
    """batch_size -> --batch-size, samples -> --samples (not -k), as_json -> --json: _Group.flag reads click's options."""
    expected = {"samples": "--samples", "batch_size": "--batch-size", "log_sigma_tensor": "--log-sigma-tensor",
                "fail_under": "--fail-under", "as_json": "--json", "show_all": "--all", "chunk_size": "--chunk-size"}
    assert {name: main.flag(name) for name in expected} == expected
    model = load_model(files["bernoulli"])
    error = _library_error(lambda: evaluate(model, np.zeros((2, D), np.float32), batch_size=0))
    assert str(error) == "samples and batch_size must be at least 1"
    assert error.render(main.flag) == "--samples and --batch-size must be at least 1"


def _marked_names(error: VaeevalError) -> list[str]:
    names: list[str] = []
    error.render(lambda name: names.append(name) or name)
    return names


def _modules_the_cli_imports() -> set[Path]:
    """The source files of vaeeval.cli and every vaeeval module it imports, directly or not."""

    def source(dotted: str) -> Path:
        path = ROOT.joinpath(*dotted.split("."))
        return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")

    found: set[Path] = set()
    pending = [f"vaeeval.cli.{path.stem}" for path in (ROOT / "vaeeval" / "cli").glob("*.py")]  # commands load lazily
    while pending:
        dotted = pending.pop()
        path = source(dotted)
        if path in found or not path.is_file():
            continue
        found.add(path)
        pending += [dotted.rsplit(".", 1)[0]] if "." in dotted else []  # its package's __init__
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                pending += [alias.name for alias in node.names if alias.name.startswith("vaeeval")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("vaeeval"):
                pending += [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return found


def test_every_parameter_a_message_of_the_cli_names_is_one_of_its_flags():
    """A renamed option would otherwise be rendered as a flag that does not exist."""
    source = "\n".join(path.read_text() for path in _modules_the_cli_imports())
    calls = re.findall(r"(?<![\w.])option\(([^)]*)\)", source)
    names = {name for call in calls for name in re.findall(r"[\"']([a-z_]+)[\"']", call)}
    for value in ({"sigma": 1.0}, {"log_sigma_tensor": "t"}, {"levels": 3}):  # likelihood_spec names them through a variable
        names.update(_marked_names(_library_error(lambda value=value: likelihood_spec("bernoulli", **value))))
    assert {"samples", "device", "sigma", "log_sigma_tensor", "levels", "arch", "shard", "plot", "tolerance"} <= names
    flags = {opt for command in main.all_commands().values() for param in command.params for opt in param.opts}
    assert {name for name in names - LIBRARY_ONLY if main.flag(name) not in flags} == set()
    assert {main.flag(name) for name in LIBRARY_ONLY} & flags == set()
