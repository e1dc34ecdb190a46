"""Hostile input: every bad file, option or situation ends in one line on stderr and exit 2 (or as stated).

The promise under test: bad input gets one line ``vaeeval: error: ...`` on stderr and exit
code 2 -- never a traceback, a hang, a warning or a wrong number; no file of the user's is
changed (every file of a case is hashed before and after); nothing from a file is unpickled or
run. Cases that could block (FIFOs, devices) run in a subprocess with a timeout; the rest run
in-process. Property tests feed the three readers (model metadata, ``.npy`` headers, results
lines) random input: each either reads it or raises its own error, nothing else.

A case's ``found`` records the bug it once found (fixed since): it stays, so the bug cannot
come back. A new bug found here is fixed in vaeeval, never marked as expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import jsonl, tiny_bernoulli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vaeeval import DataError, ModelFileError, VaeevalError, load_data, load_model, save_model
from vaeeval.cli import main
from vaeeval.io.files import locked
from vaeeval.results.formats import seal
from vaeeval.runs.stream import read_stream

ROOT = Path(__file__).resolve().parents[1]
ERROR = "vaeeval: error: "
D, N = 6, 23  # dimensions and points of the base model and data
IN_PROCESS_SECONDS = 20.0  # generous: another heavy process may share the machine
SUBPROCESS_SECONDS = 30.0  # a fresh interpreter imports torch first

# A user's VAE for --arch: linear encoder and decoder on 6 dimensions. The Fragile* classes pass the
# two-row probe arch_model makes when it loads them and fail (or go wrong) on the batches that follow.
ARCH = '''
import torch
from torch import nn


class VAE(nn.Module):
    def __init__(self, dims=6, latent_dim=2):
        super().__init__()
        self.enc = nn.Linear(dims, 2 * latent_dim)
        self.dec = nn.Linear(latent_dim, dims)

    def encode(self, x):
        return self.enc(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.dec(z)


class FragileDecode(VAE):
    def decode(self, z):
        if z.shape[0] > 2:
            raise RuntimeError("CUDA out of memory (a batch too large for the decoder)")
        return self.dec(z)


class FragileEncode(VAE):
    def encode(self, x):
        if x.shape[0] > 2:
            raise RuntimeError("CUDA out of memory (a batch too large for the encoder)")
        return self.enc(x).chunk(2, dim=-1)


class NanDecode(VAE):
    def decode(self, z):
        logits = self.dec(z)
        return logits if z.shape[0] <= 2 else logits * float("nan")


class WrongRowsDecode(VAE):
    def decode(self, z):
        logits = self.dec(z)
        return logits if z.shape[0] <= 2 else logits[:2]
'''


def _arch_line(text: str) -> int:
    """The line of ARCH (in vae.py) holding ``text``."""
    return next(number for number, line in enumerate(ARCH.splitlines(), 1) if text in line)


# ---------------------------------------------------------------- the base files every case starts from


def _run_cli(*args: Any) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, (result.stderr, repr(result.exception))
    return result.stdout


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model, its data, results files of a finished run, two shards, an --arch VAE; built once."""
    folder = tmp_path_factory.mktemp("base")
    tiny_bernoulli(folder / "model.safetensors", dims=D)
    np.save(folder / "data.npy", (np.random.default_rng(1).random((N, D)) < 0.4).astype(np.float32))
    model, data = folder / "model.safetensors", folder / "data.npy"
    (folder / "run.json").write_text(_run_cli("elbo", model, data, "-k", "8", "--output", folder / "run.jsonl", "--json"))
    for index in range(2):
        _run_cli("elbo", model, data, "-k", "8", "--shard", f"{index}/2", "--output", folder / f"part{index}.jsonl")
    _run_cli(*_ais(folder, "--output", folder / "ais.jsonl"))
    (folder / "vae.py").write_text(ARCH)
    generator = torch.Generator().manual_seed(0)
    weights = {"enc.weight": torch.randn(4, D, generator=generator), "enc.bias": torch.zeros(4),
               "dec.weight": torch.randn(D, 2, generator=generator), "dec.bias": torch.zeros(D)}
    save_file(weights, folder / "weights.safetensors")
    return folder


@pytest.fixture
def work(base: Path, tmp_path: Path) -> Path:
    """A fresh copy of the base files: each case may break them as it likes."""
    for path in base.iterdir():
        shutil.copy2(path, tmp_path / path.name)
    return tmp_path


# ---------------------------------------------------------------- helpers that break files


def _tensors_and_document(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(handle.metadata()["vaeeval"])


def _rewrite_model(path: Path, change: Callable[[dict[str, Any]], Any] | None = None,
                   tensors: Callable[[dict[str, torch.Tensor]], Any] | None = None, raw: str | None = None) -> Path:
    """Rewrite the model at ``path``: its document changed in place, its tensors changed, or the raw document text."""
    found, document = _tensors_and_document(path)
    if change is not None:
        change(document)
    if tensors is not None:
        tensors(found)
    save_file(found, path, metadata={"vaeeval": raw if raw is not None else json.dumps(document)})
    return path


def _rewrite_header(path: Path, change: Callable[[dict[str, Any]], Any] | None = None, raw: bytes | None = None) -> Path:
    """Rewrite the safetensors header (the JSON after the 8-byte length) of ``path``, keeping its data."""
    content = path.read_bytes()
    length = int.from_bytes(content[:8], "little")
    if raw is None:
        header = json.loads(content[8 : 8 + length])
        change(header)
        raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + content[8 + length :])
    return path


def _conv_model(path: Path) -> Path:
    encoder = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 4))
    decoder = nn.Sequential(nn.Linear(2, 16))
    save_model(path, encoder, decoder, likelihood={"family": "bernoulli"}, input_shape=[1, 4, 4], latent_dim=2)
    return path


def _mixture_of_none(path: Path) -> Path:
    def empty_prior(tensors: dict[str, torch.Tensor]) -> None:
        tensors.update({"prior.logits": torch.zeros(0), "prior.means": torch.zeros(0, 2), "prior.log_vars": torch.zeros(0, 2)})

    def prior(document: dict[str, Any]) -> None:
        document["prior"] = {"family": "mixture_of_gaussians", "logits": "prior.logits", "means": "prior.means",
                             "log_vars": "prior.log_vars"}

    return _rewrite_model(path, prior, empty_prior)


def _poke(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors["decoder.2.weight"][1, 0] = value

    return change


def _set(*keys_and_value: Any) -> Callable[[dict[str, Any]], None]:
    """A change that sets ``document[k1][k2]... = value``."""
    *keys, last, value = keys_and_value

    def change(document: dict[str, Any]) -> None:
        for key in keys:
            document = document[key]
        document[last] = value

    return change


def _npy_header(header: str, version: int = 1) -> bytes:
    """The bytes of a ``.npy`` file's magic and header (padded as numpy pads it)."""
    text = header.encode("utf-8" if version >= 3 else "latin1", errors="replace")
    prefix = 10 if version == 1 else 12  # magic, version, header length
    text += b" " * (-(prefix + len(text) + 1) % 64) + b"\n"
    size = struct.pack("<H", len(text)) if version == 1 else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes([version, 0]) + size + text


def _member_data_offset(path: Path, name: str) -> int:
    """Where the bytes of member ``name`` start in the zip at ``path``."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    content = path.read_bytes()
    start = info.header_offset
    name_length, extra_length = struct.unpack("<HH", content[start + 26 : start + 30])
    return start + 30 + name_length + extra_length


def _flip_byte(path: Path, offset: int) -> None:
    content = bytearray(path.read_bytes())
    content[offset] ^= 0xFF
    path.write_bytes(bytes(content))


def _wrong_crc(path: Path) -> None:
    """Write a wrong CRC-32 into the local header and central directory entry of every member."""
    content = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
    for info in infos:
        wrong = struct.pack("<I", info.CRC ^ 0xDEADBEEF)
        content[info.header_offset + 14 : info.header_offset + 18] = wrong
        directory = content.find(b"PK\x01\x02")
        while directory >= 0:
            name_length = struct.unpack("<H", content[directory + 28 : directory + 30])[0]
            if content[directory + 46 : directory + 46 + name_length].decode() == info.filename:
                content[directory + 16 : directory + 20] = wrong
                break
            directory = content.find(b"PK\x01\x02", directory + 1)
    path.write_bytes(bytes(content))


def _zip_bomb(path: Path, rows: int = 2_000_000) -> Path:
    """An .npz of zeros that inflates to rows x D float32 (48 MB at the default) from about 50 kB."""
    np.savez_compressed(path, x=np.zeros((rows, D), dtype=np.float32))
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _edit_line(source: Path, target: Path, number: int, change: Callable[[Any], Any]) -> Path:
    """``target``: ``source`` with line ``number`` (0-based) parsed, changed (or replaced by the result), written back."""
    lines = _lines(source)
    record = json.loads(lines[number])
    changed = change(record)
    lines[number] = changed if isinstance(changed, str) else json.dumps(record if changed is None else changed)
    return _write_lines(target, lines)


def _unfinished(path: Path) -> Path:
    """``path`` without its summary line: a part whose run has not finished (its header bound to nothing yet)."""
    return _write_lines(path, _lines(path)[:-1])


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def change(record: dict[str, Any]) -> None:
        record.pop(key)

    return change


# ---------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One hostile input: ``build(work)`` makes it in the case's folder and returns the command line."""

    id: str
    build: Callable[[Path], list[Any]]
    phrase: str
    code: int = 2
    hangs: bool = False  # could block (or needs resource limits): run in a subprocess with a timeout
    found: str | None = None  # the bug this case found when it was written (fixed since)
    limits: tuple[tuple[int, int], ...] = ()  # (resource.RLIMIT_*, bytes) for the subprocess
    timeout: float = SUBPROCESS_SECONDS  # seconds the subprocess may take

    def param(self) -> Any:
        return pytest.param(self, id=self.id)


def _elbo(w: Path, *extra: Any) -> list[Any]:
    return ["elbo", w / "model.safetensors", w / "data.npy", "-k", "8", *extra]


def _ais(w: Path, *extra: Any) -> list[Any]:
    return ["ais", w / "model.safetensors", w / "data.npy", "-k", "8", "--steps", "3", "--chains", "2", "--leapfrog", "1",
            "--limit", "4", *extra]


def _arch(w: Path, name: str = "VAE") -> list[Any]:
    return ["--arch", f"{w / 'vae.py'}:{name}", "--likelihood", "bernoulli"]


def _link(w: Path, kind: str) -> Path:
    link = w / f"{kind}.npy"
    (os.symlink if kind == "symlink" else os.link)(w / "data.npy", link)
    return link


def _fifo(w: Path, name: str) -> Path:
    path = w / name
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


OUTPUT_CASES = [
    Case("elbo --output is the data", lambda w: _elbo(w, "--output", w / "data.npy"), "is the input"),
    Case("elbo --output is the model", lambda w: _elbo(w, "--output", w / "model.safetensors"), "is the input"),
    Case("elbo --output is a symlink to the data", lambda w: _elbo(w, "--output", _link(w, "symlink")), "is the input"),
    Case("elbo --output is a hard link to the data", lambda w: _elbo(w, "--output", _link(w, "hardlink")), "is the input"),
    Case("elbo --output --resume is the data", lambda w: _elbo(w, "--output", w / "data.npy", "--resume"), "is the input"),
    Case("ais --output is the data", lambda w: _ais(w, "--output", w / "data.npy"), "is the input"),
    Case("ais --output is the model", lambda w: _ais(w, "--output", w / "model.safetensors"), "is the input"),
    Case("ais --output is a symlink to the data", lambda w: _ais(w, "--output", _link(w, "symlink")), "is the input"),
    Case("ais --output is a hard link to the data", lambda w: _ais(w, "--output", _link(w, "hardlink")), "is the input"),
    Case("merge --output is one of the parts",
         lambda w: ["merge", w / "part0.jsonl", w / "part1.jsonl", "--output", w / "part1.jsonl"], "is the input"),
    Case("convert -o is the weights",
         lambda w: ["convert", w / "weights.safetensors", *_arch(w), "--input-shape", "6", "-o", w / "weights.safetensors"],
         "is the input"),
    Case("convert -o is the --arch file",
         lambda w: ["convert", w / "weights.safetensors", *_arch(w), "--input-shape", "6", "-o", w / "vae.py"], "is the input"),
    Case("convert -o is the --data", lambda w: ["convert", w / "weights.safetensors", *_arch(w), "--data", w / "data.npy",
                                                 "-o", w / "data.npy"], "is the input"),
    Case("--plot is the data (by suffix)", lambda w: _elbo(w, "--plot", w / "data.npy"), "--plot"),
    Case("--plot is the data (a .png data file)",
         lambda w: ["elbo", w / "model.safetensors", _copy(w / "data.npy", w / "data.png"), "-k", "8", "--plot", w / "data.png"],
         "is the input"),
    Case("bdmc --save-data is the model",
         lambda w: ["bdmc", w / "model.safetensors", "--n", "2", "--steps", "2", "--chains", "1", "--save-data",
                    w / "model.safetensors"], "is the input"),
    Case("elbo --output in a missing directory", lambda w: _elbo(w, "--output", w / "missing" / "run.jsonl"), "does not exist"),
    Case("ais --output in a missing directory", lambda w: _ais(w, "--output", w / "missing" / "run.jsonl"), "does not exist"),
    Case("merge --output in a missing directory",
         lambda w: ["merge", w / "part0.jsonl", w / "part1.jsonl", "--output", w / "missing" / "m.jsonl"], "does not exist"),
    Case("convert -o in a missing directory",
         lambda w: ["convert", w / "weights.safetensors", *_arch(w), "--input-shape", "6", "-o", w / "missing" / "m.safetensors"],
         "does not exist"),
    Case("--plot in a missing directory", lambda w: _elbo(w, "--plot", w / "missing" / "p.png"), "does not exist"),
    Case("bdmc --save-data in a missing directory",
         lambda w: ["bdmc", w / "model.safetensors", "--n", "2", "--steps", "2", "--chains", "1", "--save-data",
                    w / "missing" / "sim.npz"], "does not exist"),
    Case("--plot with a suffix matplotlib cannot write", lambda w: _elbo(w, "--plot", w / "p.xyz"), "give a file name ending in"),
    Case("--plot is a directory", lambda w: _elbo(w, "--plot", (w / "plots.png").mkdir() or w / "plots.png"), "is a directory"),
    Case("--output is a directory", lambda w: _elbo(w, "--output", (w / "out").mkdir() or w / "out"), "is a directory"),
]

SPECIAL_FILE_CASES = [
    Case("a FIFO as the model", lambda w: ["elbo", _fifo(w, "model.safetensors"), w / "data.npy"], "FIFO", hangs=True),
    Case("a FIFO as the data", lambda w: ["elbo", w / "model.safetensors", _fifo(w, "data.npy")], "FIFO", hangs=True),
    Case("a FIFO as inspect's model", lambda w: ["inspect", _fifo(w, "pipe.safetensors")], "FIFO", hangs=True),
    Case("a FIFO as check's results", lambda w: ["check", _fifo(w, "pipe.jsonl"), "--baseline", w / "run.jsonl"], "FIFO",
         hangs=True),
    Case("a FIFO as a merged part", lambda w: ["merge", w / "part0.jsonl", _fifo(w, "pipe.jsonl")], "FIFO", hangs=True),
    Case("check /dev/zero", lambda w: ["check", "/dev/zero", "--baseline", w / "run.jsonl"], "a device", hangs=True),
    Case("elbo on /dev/zero as data", lambda w: ["elbo", w / "model.safetensors", "/dev/zero"], "a device", hangs=True),
    Case("a directory as the model", lambda w: ["elbo", w, w / "data.npy"], "is a directory"),
    Case("a directory as the data", lambda w: ["elbo", w / "model.safetensors", w], "holds no PNG or JPEG images"),
    Case("a directory as the baseline", lambda w: ["check", w / "run.jsonl", "--baseline", w], "is a directory"),
    Case("a missing model", lambda w: ["inspect", w / "nope.safetensors"], "no such file"),
]

_DEEP = 100_000
MODEL_CASES = [
    Case("vaeeval document nested 10^5 deep",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors",
                                              raw='{"format": 1, "x": ' + "[" * _DEEP + "]" * _DEEP + "}")], "nests"),
    Case("safetensors header nested 10^5 deep",
         lambda w: ["inspect", _rewrite_header(w / "model.safetensors",
                                               raw=b'{"x": ' + b"[" * _DEEP + b"]" * _DEEP + b"}")], "nests"),
    Case("__metadata__ holds an object",
         lambda w: ["inspect", _rewrite_header(w / "model.safetensors",
                                               lambda h: h.update({"__metadata__": {"vaeeval": {"format": 1}}}))],
         "not a map of strings"),
    Case("__metadata__ is a list",
         lambda w: ["inspect", _rewrite_header(w / "model.safetensors", lambda h: h.update({"__metadata__": ["vaeeval"]}))],
         "not a map of strings"),
    Case("a tensor entry that is not an object",
         lambda w: ["inspect", _rewrite_header(w / "model.safetensors", lambda h: h.update({"encoder.0.bias": [1, 2]}))],
         "not a readable safetensors file"),
    Case("data_offsets beyond the file",
         lambda w: ["inspect", _rewrite_header(w / "model.safetensors",
                                               lambda h: h["encoder.0.bias"].update({"data_offsets": [0, 10**20]}))],
         "truncated: its tensors need"),
    Case("data_offsets of 31 digits",
         lambda w: ["inspect", _rewrite_header(w / "model.safetensors",
                                               lambda h: h["encoder.0.bias"].update({"data_offsets": [0, 10**30]}))],
         "truncated: its tensors need"),
    Case('"format": 1.0', lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("format", 1.0))], "format 1.0"),
    Case('"format": true', lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("format", True))], "format True"),
    Case('"format": "1"', lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("format", "1"))], "format '1'"),
    Case("no format", lambda w: ["inspect", _rewrite_model(w / "model.safetensors", lambda d: d.pop("format"))], '"format"'),
    Case("the document is a list", lambda w: ["inspect", _rewrite_model(w / "model.safetensors", raw="[1]")], "JSON object"),
    Case("the document is not JSON", lambda w: ["inspect", _rewrite_model(w / "model.safetensors", raw="{format")], "not valid JSON"),
    Case("categorical levels 10**30",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("likelihood", {"family": "categorical",
                                                                                           "levels": 10**30}))], "levels"),
    Case("discrete data levels 10**30",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("data", {"domain": "discrete", "levels": 10**30}))],
         "levels"),
    Case("a conv stride of 2**63",
         lambda w: ["inspect", _rewrite_model(_conv_model(w / "conv.safetensors"), _set("encoder", 0, "stride", 2**63))],
         "stride"),
    Case("a conv padding of 10**30",
         lambda w: ["inspect", _rewrite_model(_conv_model(w / "conv.safetensors"), _set("encoder", 0, "padding", 10**30))],
         "padding"),
    Case("a conv stride pair [1, 2**63]",
         lambda w: ["inspect", _rewrite_model(_conv_model(w / "conv.safetensors"), _set("encoder", 0, "stride", [1, 2**63]))],
         "stride"),
    Case("latent_dim 10**30", lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("latent_dim", 10**30))],
         "latent_dim"),
    Case("input_shape [10**30]", lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("input_shape", [10**30]))],
         '"input_shape" must be'),
    Case("leaky_relu slope NaN",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors",
                                              raw=json.dumps(_tensors_and_document(w / "model.safetensors")[1]).replace(
                                                  '{"type": "tanh"}', '{"type": "leaky_relu", "negative_slope": NaN}', 1))],
         "NaN, which is not a JSON number"),
    Case("gaussian sigma Infinity",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors",
                                              raw=json.dumps(_tensors_and_document(w / "model.safetensors")[1]).replace(
                                                  '{"family": "bernoulli"}', '{"family": "gaussian", "sigma": Infinity}'))],
         "Infinity, which is not a JSON number"),
    Case("a likelihood family that is a list",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("likelihood", "family", ["bernoulli"]))],
         "likelihood"),
    Case("a layer type that is an object",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _set("encoder", 1, "type", {"relu": 1}))], "encoder layer 1"),
    Case("a mixture prior of 0 components", lambda w: ["inspect", _mixture_of_none(w / "model.safetensors")], "prior"),
    Case("a mixture prior of 0 components (elbo)",
         lambda w: ["elbo", _mixture_of_none(w / "model.safetensors"), w / "data.npy", "-k", "8"], "prior"),
    Case("a NaN weight (inspect)",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", tensors=_poke(float("nan")))], "'decoder.2.weight'"),
    Case("a NaN weight (elbo)",
         lambda w: ["elbo", _rewrite_model(w / "model.safetensors", tensors=_poke(float("nan"))), w / "data.npy", "-k", "8"],
         "'decoder.2.weight'"),
    Case("an infinite weight (inspect)",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", tensors=_poke(float("inf")))], "'decoder.2.weight'"),
    Case("an infinite weight (elbo)",
         lambda w: ["elbo", _rewrite_model(w / "model.safetensors", tensors=_poke(float("-inf"))), w / "data.npy", "-k", "8"],
         "'decoder.2.weight'"),
    Case("a NaN weight in an --arch state dict",
         lambda w: ["elbo", _nan_weights(w), w / "data.npy", "-k", "8", *_arch(w)], "'dec.weight'",
         found="a NaN in an --arch state dict is not named: the message blames the data (\"outputs overflow on this data\")"),
    Case("weights so large the decoder overflows",
         lambda w: ["elbo", _rewrite_model(w / "model.safetensors", tensors=_huge_weights), w / "data.npy", "-k", "8"],
         "outputs overflow"),
    Case("compare: a model whose decoder overflows",
         lambda w: ["compare", _copy(w / "model.safetensors", w / "good.safetensors"),
                    _rewrite_model(w / "model.safetensors", tensors=_huge_weights), w / "data.npy", "-k", "8"],
         "model.safetensors:", found="compare does not say which of its models overflows"),
    Case("a 5000-digit latent_dim",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", raw=json.dumps(
             _tensors_and_document(w / "model.safetensors")[1]).replace('"latent_dim": 2', '"latent_dim": 1' + "0" * 5000))],
         "vaeeval document", found="a JSON integer over 4300 digits gives Python's 'use sys.set_int_max_str_digits()' message, "
                                 "not where it is"),
    Case("an empty model file", lambda w: ["inspect", _write_bytes(w / "m.safetensors", b"")], "only 0 bytes"),
    Case("a pickled model", lambda w: ["inspect", _write_bytes(w / "m.pt", pickle.dumps({"a": 1}))], "pickle"),
    Case("10,000 relu layers",
         lambda w: ["inspect", _rewrite_model(w / "model.safetensors", _many_relus), "--json"], "", code=0),
]


def _many_relus(document: dict[str, Any]) -> None:
    document["encoder"][1:2] = [{"type": "relu"}] * 10_000


def _copy(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    return target


def _write_bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _nan_weights(w: Path) -> Path:
    path = w / "weights.safetensors"
    with safe_open(path, "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["dec.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    return path


def _huge_weights(tensors: dict[str, torch.Tensor]) -> None:
    for name in ("decoder.0.weight", "decoder.2.weight", "decoder.2.bias"):
        tensors[name].fill_(3e38)


def _npz_with(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _stored_npz_with_bad_crc(w: Path) -> Path:
    path = w / "bad.npz"
    np.savez(path, x=np.load(w / "data.npy"))
    _flip_byte(path, _member_data_offset(path, "x.npy") + 200)
    return path


def _object_array(path: Path) -> Path:
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return path


def _giant_npy(path: Path) -> Path:
    path.write_bytes(_npy_header(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({10**12}, {D}), }}") + b"\0" * 96)
    return path


def _header_too_long(path: Path) -> Path:
    path.write_bytes(_npy_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 6), " + " " * 20_000 + "}", 2)
                     + b"\0" * 24)
    return path


def _data(w: Path, path: Path, *extra: Any) -> list[Any]:
    """``elbo`` of the base model on the data file ``path``."""
    return ["elbo", w / "model.safetensors", path, "-k", "8", *extra]


def _header_text(shape: str, descr: str = "<f4") -> str:
    return f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"


DATA_CASES = [
    Case(".npz with a member that is not .npy",
         lambda w: _data(w, _npz_with(w / "d.npz", {"x.npy": _npy_bytes(np.load(w / "data.npy")), "evil.pkl": b"\x80"})),
         "is not a .npy array"),
    Case(".npz with no arrays", lambda w: _data(w, _npz_with(w / "d.npz", {})), "no arrays"),
    Case(".npz member holding a pickle",
         lambda w: _data(w, _npz_with(w / "d.npz", {"x.npy": _object_array(w / "o.npy").read_bytes()})), "Python objects"),
    Case(".npz member holding strings",
         lambda w: _data(w, _npz_with(w / "d.npz", {"x.npy": _npy_bytes(np.array([["a"] * D]))})), "numeric"),
    Case(".npz truncated to half", lambda w: _data(w, _truncated_npz(w)), "truncated or corrupt"),
    Case(".npz stored member with a bad CRC", lambda w: _data(w, _stored_npz_with_bad_crc(w)), "Bad CRC-32"),
    Case(".npz member shorter than its header declares",
         lambda w: _data(w, _npz_with(w / "d.npz", {"x.npy": _npy_bytes(np.load(w / "data.npy"))[:-40]})), "header declares"),
    Case(".npy header claiming 10^12 rows", lambda w: _data(w, _giant_npy(w / "big.npy")), "header declares"),
    Case(".npy header longer than numpy reads safely", lambda w: _data(w, _header_too_long(w / "long.npy")), "truncated or corrupt"),
    Case(".npy with a negative shape",
         lambda w: _data(w, _write_bytes(w / "neg.npy", _npy_header(_header_text("(-4, 6)")) + b"\0" * 96)), "negative"),
    Case(".npy header that is not a literal",
         lambda w: _data(w, _write_bytes(w / "code.npy", _npy_header(f"__import__('os').system('touch {w / 'pwned'}')"))),
         "truncated or corrupt"),
    Case(".npy header shape (2**70, 0)",
         lambda w: _data(w, _write_bytes(w / "wide.npy", _npy_header(_header_text(f"({2**70}, 0)")))), "wide.npy",
         found="a .npy whose shape overflows a C long escapes load_data as OverflowError"),
    Case(".npy header ')'", lambda w: _data(w, _write_bytes(w / "paren.npy", _npy_header(")"))), "paren.npy",
         found="a .npy header numpy cannot tokenize escapes load_data as tokenize.TokenError"),
    Case(".npz member header ')'", lambda w: _data(w, _npz_with(w / "paren.npz", {"x.npy": _npy_header(")")})), "paren.npz",
         found="a .npy header numpy cannot tokenize escapes load_data as tokenize.TokenError"),
    Case(".npz member header shape (2**70, 0)",
         lambda w: _data(w, _npz_with(w / "wide.npz", {"x.npy": _npy_header(_header_text(f"({2**70}, 0)"))})), "wide.npz"),
    Case("zip bomb refused by --max-data-size before inflating",
         lambda w: _data(w, _zip_bomb(w / "bomb.npz"), "--max-data-size", "1M"), "more than the 1,048,576 allowed"),
    Case("zip bomb refused by --max-data-size even with --limit 1",
         lambda w: _data(w, _zip_bomb(w / "bomb.npz"), "--max-data-size", "1M", "--limit", "1"), "allowed (--max-data-size)"),
    Case("zip bomb with a wrong CRC, read whole", lambda w: _data(w, _bomb_with_wrong_crc(w)), "Bad CRC-32"),
    Case("a pickle (object array .npy)", lambda w: _data(w, _object_array(w / "o.npy")), "Python objects"),
    Case("a pickle (raw)", lambda w: _data(w, _write_bytes(w / "p.npy", pickle.dumps(np.zeros((N, D))))), "never unpickles"),
    Case("an empty data file", lambda w: _data(w, _write_bytes(w / "e.npy", b"")), "not a .npy or .npz file"),
    Case("a random-bytes data file", lambda w: _data(w, _write_bytes(w / "r.npy", np.random.default_rng(0).bytes(4096))),
         "not a .npy or .npz file"),
    Case("a .npy cut off after its magic", lambda w: _data(w, _write_bytes(w / "m.npy", b"\x93NUMPY")), "truncated or corrupt"),
    Case("data with NaN", lambda w: _data(w, _save(w / "nan.npy", np.full((3, D), np.nan, np.float32))), "must be finite"),
    Case("data of zero points", lambda w: _data(w, _save(w / "none.npy", np.zeros((0, D), np.float32))), "no data points"),
    Case("data of zero-size points", lambda w: _data(w, _save(w / "z.npy", np.zeros((3, 0), np.float32))), "the model needs"),
    Case("a 0-d array", lambda w: _data(w, _save(w / "s.npy", np.float32(1.0))), "the model needs"),
    Case("complex data", lambda w: _data(w, _save(w / "c.npy", np.zeros((3, D), np.complex64))), "numeric"),
    Case("--key on a .npy", lambda w: _data(w, w / "data.npy", "--key", "x"), "--key"),
    Case("--key missing from an .npz",
         lambda w: _data(w, _npz_with(w / "d.npz", {"x.npy": _npy_bytes(np.load(w / "data.npy"))}), "--key", "y"), "has no array"),
]


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _truncated_npz(w: Path) -> Path:
    path = w / "t.npz"
    np.savez_compressed(path, x=np.load(w / "data.npy"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _bomb_with_wrong_crc(w: Path) -> Path:
    path = _zip_bomb(w / "bomb.npz")
    _wrong_crc(path)
    return path


OPTION_CASES = [
    Case("-k 0", lambda w: _elbo(w, "-k", "0"), "--samples"),
    Case("-k 2**63", lambda w: _elbo(w, "-k", str(2**63)), "--samples"),
    Case("-k 10**30", lambda w: _elbo(w, "-k", str(10**30)), "--samples"),
    Case("--discretize 10**30", lambda w: _elbo(w, "--discretize", str(10**30)), "--discretize"),
    Case("--discretize 1", lambda w: _elbo(w, "--discretize", "1"), "--discretize"),
    Case("--max-memory 0.5", lambda w: _elbo(w, "--max-memory", "0.5"), "--max-memory"),
    Case("--max-memory 10**30", lambda w: _elbo(w, "--max-memory", str(10**30)), "--max-memory"),
    Case("--max-memory 1e3", lambda w: _elbo(w, "--max-memory", "1e3"), "--max-memory"),
    Case("--max-memory 16 (less than one chunk)", lambda w: _elbo(w, "--max-memory", "16"), "give at least 4K"),
    Case("ais --max-memory 16 (less than one chunk)", lambda w: _ais(w, "--max-memory", "16"), "--max-memory"),
    Case("--max-data-size 0", lambda w: _elbo(w, "--max-data-size", "0"), "--max-data-size"),
    Case("--batch-size 0", lambda w: _elbo(w, "--batch-size", "0"), "--batch-size"),
    Case("--batch-size 10**30", lambda w: _elbo(w, "--batch-size", str(10**30)), "--batch-size"),
    Case("--limit 0", lambda w: _elbo(w, "--limit", "0"), "--limit"),
    Case("check --tolerance nan", lambda w: ["check", w / "run.jsonl", "--baseline", w / "run.jsonl", "--tolerance", "nan"],
         "--tolerance"),
    Case("check --tolerance -1", lambda w: ["check", w / "run.jsonl", "--baseline", w / "run.jsonl", "--tolerance", "-1"],
         "--tolerance"),
    Case("check --confidence 2", lambda w: ["check", w / "run.jsonl", "--baseline", w / "run.jsonl", "--confidence", "2"],
         "--confidence"),
    Case("check --confidence 1", lambda w: ["check", w / "run.jsonl", "--baseline", w / "run.jsonl", "--confidence", "1"],
         "--confidence"),
    Case("check --confidence inf", lambda w: ["check", w / "run.jsonl", "--baseline", w / "run.jsonl", "--confidence", "inf"],
         "--confidence"),
    Case("--seed -1", lambda w: _elbo(w, "--seed", "-1"), "--seed"),
    Case("--seed 2**64", lambda w: _elbo(w, "--seed", str(2**64)), "--seed"),
    Case("--shard 5/2", lambda w: _elbo(w, "--shard", "5/2", "--output", w / "p.jsonl"), "--shard"),
    Case("--shard x", lambda w: _elbo(w, "--shard", "x", "--output", w / "p.jsonl"), "--shard"),
    Case("--shard 0/0", lambda w: _elbo(w, "--shard", "0/0", "--output", w / "p.jsonl"), "--shard"),
    Case("--shard -1/2", lambda w: _elbo(w, "--shard", "-1/2", "--output", w / "p.jsonl"), "--shard"),
    Case("--shard 0/10**30 (an empty part)", lambda w: _elbo(w, "--shard", f"0/{10**30}", "--output", w / "p.jsonl"),
         "holds none of the 23 points", code=0),
    Case("--fail-under iwae=nan", lambda w: _elbo(w, "--fail-under", "iwae=nan"), "--fail-under"),
    Case("--fail-under iwae=1e999", lambda w: _elbo(w, "--fail-under", "iwae=1e999"), "--fail-under"),
    Case("ais --steps 0", lambda w: _ais(w, "--steps", "0"), "--steps"),
    Case("ais --chains 10**9", lambda w: _ais(w, "--chains", str(10**9)), "--chains"),
    Case("ais --step-size nan", lambda w: _ais(w, "--step-size", "nan"), "--step-size"),
    Case("ais --step-size 0", lambda w: _ais(w, "--step-size", "0"), "--step-size"),
    Case("ais --leapfrog 0", lambda w: _ais(w, "--leapfrog", "0"), "--leapfrog"),
    Case("ais --pilot-chains 10**9", lambda w: _ais(w, "--pilot-chains", str(10**9)), "--pilot-chains"),
    Case("bdmc --n 0", lambda w: ["bdmc", w / "model.safetensors", "--n", "0"], "--n"),
    Case("bdmc --n 10**30", lambda w: ["bdmc", w / "model.safetensors", "--n", str(10**30)], "--n"),
    Case("--arch-args nested 10^5 deep",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", *_arch(w), "--arch-args",
                    '{"a": ' + "[" * _DEEP + "]" * _DEEP + "}"], "--arch-args",
         found="--arch-args nested deep escapes as RecursionError"),
    Case("--input-shape 0", lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", *_arch(w), "--input-shape", "0"],
         "--input-shape"),
    Case("--input-shape 10**30",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", *_arch(w), "--input-shape", str(10**30)], "--input-shape"),
]

# ---------------------------------------------------------------- results files

RESULTS_EDITS: list[tuple[str, Callable[[Path, Path], Path], str, str | None]] = [
    # (id, make target from (base results file, target), phrase, the bug it found)
    ("a point line [1]", lambda s, t: _edit_line(s, t, 1, lambda r: "[1]"), "line 2 is list", None),
    ("a point line null", lambda s, t: _edit_line(s, t, 1, lambda r: "null"), "line 2 is NoneType", None),
    ("a first line [1]", lambda s, t: _edit_line(s, t, 0, lambda r: "[1]"), "not a vaeeval results file", None),
    ("a header whose settings are null", lambda s, t: _edit_line(s, t, 0, lambda r: seal({**r, "settings": None})),
     "not a complete", None),
    ("a header missing keys", lambda s, t: _edit_line(s, t, 0, lambda r: seal({k: r[k] for k in ("kind", "schema")})),
     "not a complete", None),
    ("a header whose schema is a list", lambda s, t: _edit_line(s, t, 0, lambda r: {**r, "schema": [r["schema"]]}),
     "not a vaeeval results file", "an unhashable schema escapes as TypeError"),
    ("a header holding a NaN", lambda s, t: _edit_line(s, t, 0, lambda r: json.dumps(r)[:-1] + ', "note": NaN}'),
     "line 1", "NaN in a header escapes from seal() as ValueError"),
    ("a header edited after it was written",
     lambda s, t: _edit_line(s, t, 0, lambda r: r["settings"].update({"samples": 9})), "header was edited", None),
    ("a point without an index", lambda s, t: _edit_line(s, t, 1, _drop("index")), "point index None", None),
    ("a point whose iwae is null", lambda s, t: _edit_line(s, t, 1, lambda r: r.update({"iwae": None})), "iwae is None", None),
    ("a point whose iwae is Infinity",
     lambda s, t: _edit_line(s, t, 1, lambda r: json.dumps({**r, "iwae": 0}).replace('"iwae": 0', '"iwae": Infinity')),
     "Infinity", None),
    ("a point whose index is true", lambda s, t: _edit_line(s, t, 1, lambda r: r.update({"index": True})), "point index True",
     None),
    ("a point index out of range", lambda s, t: _edit_line(s, t, 1, lambda r: r.update({"index": N})), "not one of the data's",
     None),
    ("a point index of 10**5000", lambda s, t: _edit_line(s, t, 1, lambda r: json.dumps(r).replace(
        '"index": 0', '"index": 1' + "0" * 5000)), "line 2",
     "a JSON integer over 4300 digits gives Python's 'use sys.set_int_max_str_digits()' message, not the line"),
    ("the same index twice", lambda s, t: _edit_line(s, t, 2, lambda r: r.update({"index": 0})), "twice", None),
    ("a finished file with one point line deleted", lambda s, t: _write_lines(t, _lines(s)[:5] + _lines(s)[6:]),
     "was edited after the run finished", None),
    ("a finished file with a point holding NaN in an extra key",
     lambda s, t: _edit_line(s, t, 1, lambda r: json.dumps(r)[:-1] + ', "note": NaN}'), "line 2",
     "NaN in a point line escapes from points_digest() as ValueError"),
    ("a finished file whose summary count is a string",
     lambda s, t: _edit_line(s, t, -1, lambda r: r.update({"count": "23"})), "was edited", None),
    ("a line that is not JSON", lambda s, t: _edit_line(s, t, 3, lambda r: "{index: 2"), "line 4 is not JSON", None),
    ("a line nested 10^5 deep", lambda s, t: _edit_line(s, t, 3, lambda r: "[" * _DEEP + "]" * _DEEP), "nests", None),
    ("an empty file", lambda s, t: _write_bytes(t, b""), "not a vaeeval results file", None),
    ("binary garbage", lambda s, t: _write_bytes(t, np.random.default_rng(0).bytes(2000)), "not a vaeeval results file",
     None),
]


# the files --resume cuts (repairs) before it knows they are results files
_RESUME_CUTS = "--resume cuts the last line of any file before checking it is a results file"


def _results_case(command: str, name: str, make: Callable[[Path, Path], Path], phrase: str, found: str | None) -> Case:
    def build(w: Path) -> list[Any]:
        target = make(w / "run.jsonl", w / "bad.jsonl")
        if command == "check":
            return ["check", target, "--baseline", w / "run.jsonl"]
        if command == "check --baseline":
            return ["check", w / "run.jsonl", "--baseline", target]
        if command == "merge":
            return ["merge", target]
        return _elbo(w, "--output", target, "--resume")

    if command == "elbo --resume" and name == "binary garbage":
        found = _RESUME_CUTS
    return Case(f"{command}: {name}", build, phrase, found=found)


RESULTS_CASES = [
    _results_case(command, name, make, phrase, bug)
    for name, make, phrase, bug in RESULTS_EDITS
    for command in ("check", "merge", "elbo --resume")
] + [
    _results_case("check --baseline", name, make, phrase, bug) for name, make, phrase, bug in RESULTS_EDITS[:3]
] + [
    Case("check: a JSON document without a summary",
         lambda w: ["check", _json_without(w, "summary"), "--baseline", w / "run.jsonl"], "not a complete vaeeval.elbo/1"),
    Case("check: a JSON document without points",
         lambda w: ["check", _json_without(w, "points"), "--baseline", w / "run.jsonl"], "not a complete vaeeval.elbo/1"),
    Case("check: a JSON document whose schema is a list",
         lambda w: ["check", _json_changed(w, "schema", ["vaeeval.elbo/1"]), "--baseline", w / "run.jsonl"], "bad.json",
         found="an unhashable schema escapes read_results as TypeError"),
    Case("check: a JSON document with a NaN iwae",
         lambda w: ["check", _json_points_nan(w), "--baseline", w / "run.jsonl"], "NaN, which is not a JSON number"),
    Case("check: a JSON document nested 10^5 deep",
         lambda w: ["check", _write_bytes(w / "bad.json", b"[" * _DEEP + b"]" * _DEEP), "--baseline", w / "run.jsonl"], "nests"),
    Case("merge: a part of another run",
         lambda w: ["merge", w / "part0.jsonl", _unfinished(_edit_line(w / "part1.jsonl", w / "bad.jsonl", 0,
                                                                       lambda r: seal({**r, "data": {**r["data"], "digest": "x"}})))],
         "is not part of the run"),
    Case("merge: a part given twice", lambda w: ["merge", w / "part0.jsonl", w / "part0.jsonl", w / "part1.jsonl"],
         "more than one file"),
    Case("merge: a shard missing", lambda w: ["merge", w / "part0.jsonl"], "missing"),
    Case("elbo --resume: a results file of another seed", lambda w: _elbo(w, "--output", w / "run.jsonl", "--resume", "--seed", "1"),
         "holds another run"),
    Case("elbo --resume: an ais results file", lambda w: _elbo(w, "--output", w / "ais.jsonl", "--resume"), "holds another run"),
    Case("ais --resume: a finished file with one point line deleted",
         lambda w: _ais(w, "--output", _write_lines(w / "ais.jsonl", _lines(w / "ais.jsonl")[:2] + _lines(w / "ais.jsonl")[3:]),
                        "--resume"), "was edited after the run finished"),
    Case("ais --resume: a header edited after it was written",
         lambda w: _ais(w, "--output", _edit_line(w / "ais.jsonl", w / "ais.jsonl", 0,
                                                  lambda r: r["settings"].update({"steps": 4})), "--resume"),
         "header was edited"),
    Case("ais --resume: a point whose ais is null",
         lambda w: _ais(w, "--output", _edit_line(w / "ais.jsonl", w / "ais.jsonl", 1, lambda r: r.update({"ais": None})),
                        "--resume"), "ais is None"),
    Case("merge: an ais part with the same index twice",
         lambda w: ["merge", _edit_line(w / "ais.jsonl", w / "bad.jsonl", 2, lambda r: r.update({"index": 0}))], "twice"),
    Case("check: an ais results file against an elbo baseline",
         lambda w: ["check", w / "ais.jsonl", "--baseline", w / "run.jsonl"], "cover different data"),
]


def _json_without(w: Path, key: str) -> Path:
    document = json.loads((w / "run.json").read_text())
    document.pop(key)
    (w / "bad.json").write_text(json.dumps(document))
    return w / "bad.json"


def _json_changed(w: Path, key: str, value: Any) -> Path:
    document = json.loads((w / "run.json").read_text())
    document[key] = value
    (w / "bad.json").write_text(json.dumps(document))
    return w / "bad.json"


def _json_points_nan(w: Path) -> Path:
    document = json.loads((w / "run.json").read_text())
    document["points"][0]["iwae"] = float("nan")
    (w / "bad.json").write_text(json.dumps(document))
    return w / "bad.json"


# ---------------------------------------------------------------- --arch code that fails after the probe

ARCH_CASES = [
    Case("--arch decode fails on a real batch",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", "-k", "8", *_arch(w, "FragileDecode")],
         f"vae.py:{_arch_line('a batch too large for the decoder')}"),
    Case("--arch encode fails on a real batch",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", "-k", "8", *_arch(w, "FragileEncode")],
         f"vae.py:{_arch_line('a batch too large for the encoder')}"),
    Case("--arch decode fails on a real batch (ais)",
         lambda w: ["ais", w / "weights.safetensors", w / "data.npy", "-k", "8", "--steps", "3", "--chains", "2",
                    *_arch(w, "FragileDecode")], f"vae.py:{_arch_line('a batch too large for the decoder')}"),
    Case("--arch decode fails on a real batch (latents)",
         lambda w: ["latents", w / "weights.safetensors", w / "data.npy", "-k", "8", *_arch(w, "FragileDecode")],
         f"vae.py:{_arch_line('a batch too large for the decoder')}"),
    Case("--arch decode fails on a real batch (--output)",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", "-k", "8", *_arch(w, "FragileDecode"), "--output",
                    w / "out.jsonl"], f"vae.py:{_arch_line('a batch too large for the decoder')}"),
    Case("--arch decode gives NaN on a real batch",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", "-k", "8", *_arch(w, "NanDecode")], "elbo is nan"),
    Case("--arch decode gives too few rows on a real batch",
         lambda w: ["elbo", w / "weights.safetensors", w / "data.npy", "-k", "8", *_arch(w, "WrongRowsDecode")], "decode",
         found="a decode(z) returning fewer rows than z after the probe escapes as RuntimeError (shape ... is invalid)"),
]

_FULL_DISK = ((resource.RLIMIT_FSIZE, 4096),)  # writes past 4 kB fail with EFBIG, as on a full disk
_SMALL_MEMORY = ((resource.RLIMIT_AS, 1500 << 20),)  # enough for torch and a small run

RESOURCE_CASES = [
    Case("elbo --output is a FIFO", lambda w: _elbo(w, "--output", _fifo(w, "out.jsonl")), "FIFO", hangs=True, timeout=10,
         found="--output on a FIFO blocks forever in open()"),
    Case("elbo --resume on a file that is not a results file",
         lambda w: _elbo(w, "--output", _write_bytes(w / "notes.txt", b"my notes\nthe last line, unterminated"), "--resume"),
         "not a vaeeval results file", found=_RESUME_CUTS),
    Case("elbo --output on a full disk", lambda w: _elbo(w, "--output", w / "out.jsonl"), "out.jsonl", hangs=True,
         limits=_FULL_DISK, found="a failed write of a results file escapes as OSError (File too large / No space left)"),
    Case("merge --output on a full disk",
         lambda w: ["merge", w / "part0.jsonl", w / "part1.jsonl", "--output", w / "out.jsonl"], "out.jsonl", hangs=True,
         limits=_FULL_DISK, found="a failed write of a merged results file escapes as OSError"),
    Case("--plot on a full disk", lambda w: _elbo(w, "--plot", w / "p.png"), "cannot write the plot", hangs=True,
         limits=_FULL_DISK),
    Case("merge: a results file claiming 10^12 points",
         lambda w: ["merge", _unfinished(_edit_line(w / "part0.jsonl", w / "bad.jsonl", 0, lambda r: seal(
             {**r, "data": {**r["data"], "n": 10**12}, "shard": {"index": 0, "count": 2, "start": 0, "stop": 5 * 10**11}})))],
         "missing",
         hangs=True, limits=_SMALL_MEMORY,
         found="merge builds set(range(n)) from a header's n: MemoryError (or all the machine's memory)"),
]

CASES = [*OUTPUT_CASES, *SPECIAL_FILE_CASES, *MODEL_CASES, *DATA_CASES, *OPTION_CASES, *RESULTS_CASES, *ARCH_CASES, *RESOURCE_CASES]


# ---------------------------------------------------------------- the contract, checked for every case


def _hashes(folder: Path) -> dict[Path, str]:
    """sha256 of every regular file under ``folder`` (FIFOs and other special files are not opened)."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                found[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@dataclass
class Outcome:
    """How one command line ended."""

    code: int
    stdout: str
    stderr: str
    escaped: BaseException | None  # an exception other than SystemExit, in-process
    warnings: list[str]
    seconds: float


def _in_process(args: list[Any]) -> Outcome:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)
        started = time.monotonic()
        result = CliRunner().invoke(main, [str(arg) for arg in args])
        seconds = time.monotonic() - started
    escaped = result.exception if result.exception is not None and not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stdout, result.stderr, escaped,
                   [f"{w.category.__name__}: {w.message}" for w in caught], seconds)


def _in_subprocess(args: list[str], cwd: Path, limits: tuple[tuple[int, int], ...] = (),
                   timeout: float = SUBPROCESS_SECONDS) -> Outcome:
    def limited() -> None:
        for which, size in limits:
            resource.setrlimit(which, (size, size))

    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "vaeeval", *args], capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, preexec_fn=limited if limits else None)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vaeeval {' '.join(args)} did not finish in {timeout:g} s (it hangs)")
    return Outcome(done.returncode, done.stdout, done.stderr, None, [], time.monotonic() - started)


def _check_contract(case: Case, outcome: Outcome, before: dict[Path, str], after: dict[Path, str], folder: Path) -> None:
    why = (f"\nexit code {outcome.code}\nstdout: {outcome.stdout[-2000:]!r}\nstderr: {outcome.stderr[-3000:]!r}"
           f"\nescaped: {outcome.escaped!r}\nwarnings: {outcome.warnings}")
    assert outcome.escaped is None, "an exception escaped the CLI" + why
    assert "Traceback" not in outcome.stdout + outcome.stderr, why
    assert outcome.code == case.code, why
    assert "Warning" not in outcome.stderr and not outcome.warnings, why
    if case.code == 2:
        assert outcome.stderr.startswith(ERROR) and outcome.stderr.count("\n") == 1, why
        assert outcome.stdout == "", why
    assert case.phrase in outcome.stderr, why
    changed = [str(path.relative_to(folder)) for path in before if after.get(path) != before[path]]
    assert not changed, f"files changed or removed: {changed}" + why
    assert not (folder / "pwned").exists(), "vaeeval ran code from a file" + why
    litter = [str(path.relative_to(folder)) for path in after if path.name.endswith((".partial", ".lock"))]
    assert not litter, f"left behind: {litter}" + why
    limit = case.timeout if case.hangs else IN_PROCESS_SECONDS
    assert outcome.seconds < limit, f"took {outcome.seconds:.1f} s" + why


@pytest.mark.parametrize("case", [case.param() for case in CASES])
def test_hostile_input(case: Case, work: Path) -> None:
    args = [str(arg) for arg in case.build(work)]
    before = _hashes(work)
    outcome = _in_subprocess(args, work, case.limits, case.timeout) if case.hangs else _in_process(args)
    _check_contract(case, outcome, before, _hashes(work), work)


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


# ---------------------------------------------------------------- situations, not files


def _points_of(document: str) -> list[dict[str, Any]]:
    return json.loads(document)["points"]


def test_a_zip_bomb_is_inflated_only_as_far_as_limit_needs(work: Path) -> None:
    """--limit 1 inflates one row of a 48 MB member whose CRC is wrong: it never reaches the end, so it succeeds;
    read whole, the wrong CRC is found (the case table); a small --max-data-size refuses it from its header alone."""
    bomb = _bomb_with_wrong_crc(work)
    started = time.monotonic()
    outcome = _in_process(_elbo(work)[:2] + [str(bomb), "-k", "8", "--limit", "1", "--json"])
    assert outcome.code == 0 and outcome.escaped is None, outcome.stderr
    document = json.loads(outcome.stdout)
    assert document["data"]["n"] == 1 and document["data"]["total"] == 2_000_000
    assert time.monotonic() - started < IN_PROCESS_SECONDS


def test_empty_shards_are_valid_parts_that_merge_into_the_unsharded_run(work: Path) -> None:
    """Two points in four shards: two parts hold nothing, exit 0 with one line, and merge with the others."""
    model, data = work / "model.safetensors", work / "data.npy"
    whole = _in_process(["elbo", str(model), str(data), "-k", "8", "--limit", "2", "--json"])
    assert whole.code == 0, whole.stderr
    parts = []
    for index in range(4):
        part = work / f"limited{index}.jsonl"
        outcome = _in_process(["elbo", str(model), str(data), "-k", "8", "--limit", "2", "--shard", f"{index}/4",
                               "--output", str(part)])
        assert outcome.code == 0 and outcome.escaped is None, outcome.stderr
        if index in (0, 2):  # points index*2//4 .. (index+1)*2//4: none
            assert outcome.stderr.count("\n") == 1 and "holds none of the 2 points" in outcome.stderr, outcome.stderr
            assert outcome.stdout == ""
            records = jsonl(part)
            assert [record.get("kind") for record in records] == ["header", "summary"] and records[1]["count"] == 0
        parts.append(str(part))
    merged = _in_process(["merge", *parts, "--json"])
    assert merged.code == 0 and merged.escaped is None, merged.stderr
    assert _points_of(merged.stdout) == _points_of(whole.stdout)
    assert json.loads(merged.stdout)["summary"] == json.loads(whole.stdout)["summary"]
    assert _in_process(["merge", parts[0], parts[2]]).code == 2  # empty parts alone are not a run


def test_an_output_in_use_is_refused_and_wait_waits_for_it(work: Path) -> None:
    output = work / "run.jsonl"
    before = _hashes(work)
    with locked(output):
        refused = _in_process(_elbo(work, "--output", output, "--resume"))
    assert refused.code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"in use by another vaeeval run (pid {os.getpid()})" in refused.stderr and "--wait" in refused.stderr
    assert _hashes(work) == before

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with locked(output):
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(30)
        waiting = subprocess.Popen([sys.executable, "-m", "vaeeval", *map(str, _elbo(work, "--output", output, "--resume",
                                                                                  "--wait", "--json"))],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)
        time.sleep(1.0)
        assert waiting.poll() is None, "the run did not wait for the lock"
    finally:
        release.set()
        holder.join()
    stdout, stderr = waiting.communicate(timeout=SUBPROCESS_SECONDS)
    assert waiting.returncode == 0 and "Traceback" not in stderr, stderr
    assert _points_of(stdout) == _points_of((work / "run.json").read_text())
    assert not (work / "run.jsonl.lock").exists()


def test_a_lock_file_that_is_a_symlink_never_writes_through_it(work: Path) -> None:
    """A planted ``<output>.lock`` symlink must not make vaeeval truncate the file it points to."""
    notes = _write_bytes(work / "notes.txt", b"the user's notes\n")
    os.symlink(notes, work / "out.jsonl.lock")
    outcome = _in_process(_elbo(work, "--output", work / "out.jsonl"))
    assert outcome.escaped is None and outcome.code in (0, 2), outcome.stderr
    if outcome.code == 2:
        assert outcome.stderr.count("\n") == 1
    assert notes.read_bytes() == b"the user's notes\n", "vaeeval wrote through the lock's symlink"



def _slow_run(output: Path) -> list[str]:
    """The categorical sample model at K = 20000 on one point: about half a second of work after the header."""
    return [sys.executable, "-m", "vaeeval", "elbo", str(ROOT / "sample_models/digits_categorical.safetensors"),
            str(ROOT / "sample_models/digits_grey_test.npy"), "-k", "20000", "--batch-size", "1", "--limit", "1",
            "--output", str(output)]


def test_ctrl_c_before_the_first_point_exits_130_and_resume_gives_the_uninterrupted_numbers(work: Path) -> None:
    output = work / "slow.jsonl"
    args = _slow_run(output)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SUBPROCESS_SECONDS
    while not (output.exists() and output.read_text().count("\n") >= 1):  # the header: the run has started
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before its first point"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=SUBPROCESS_SECONDS)
    assert process.returncode == 130, stderr
    assert stderr == "vaeeval: interrupted before any point was done\n" and stdout == ""
    assert [record.get("kind") for record in jsonl(output)] == ["header"]
    resumed = _in_process([*args[3:], "--resume", "--json"])  # the same command line, without the interpreter
    assert resumed.code == 0 and resumed.escaped is None, resumed.stderr
    fresh = _in_process([*args[3:-1], work / "fresh.jsonl", "--json"])
    assert fresh.code == 0 and fresh.escaped is None, fresh.stderr
    assert _points_of(resumed.stdout) == _points_of(fresh.stdout)
    assert jsonl(output)[1:] == jsonl(work / "fresh.jsonl")[1:]


def _mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_ctrl_c_while_starting_up_prints_one_line(work: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "vaeeval", *map(str, _elbo(work))], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + SUBPROCESS_SECONDS
    while not _mapped(process.pid, "libtorch"):  # torch is being imported
        assert process.poll() is None and time.monotonic() < deadline, "vaeeval ended before torch was loaded"
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=SUBPROCESS_SECONDS)
    assert process.returncode in (130, -signal.SIGINT), stderr  # -2: died of SIGINT, which a shell shows as 130
    assert "Traceback" not in stderr and stderr.count("\n") <= 1, stderr


# ---------------------------------------------------------------- property tests: each reader reads or raises its own error

_WORDS = st.sampled_from([
    "format", "input_shape", "latent_dim", "encoder", "decoder", "likelihood", "prior", "data", "type", "tensor",
    "linear", "relu", "tanh", "leaky_relu", "negative_slope", "conv2d", "conv_transpose2d", "flatten", "unflatten", "shape",
    "stride", "padding", "output_padding", "family", "bernoulli", "gaussian", "categorical", "discretized_logistic",
    "laplace", "continuous_bernoulli", "levels", "sigma", "log_sigma", "scale", "mixture_of_gaussians", "standard_normal",
    "logits", "means", "log_vars", "mean", "log_var", "domain", "binary", "discrete", "unit_interval", "real",
    "description", "encoder.0", "encoder.2", "decoder.0", "decoder.2", "index", "iwae", "elbo", "kind", "summary", "count",
    "digest", "header",
]) | st.text(max_size=6)
_SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 2, 6, -1, 2**63, 10**30])
            | st.floats(allow_nan=True, allow_infinity=True) | _WORDS)
_JSON = st.recursive(_SCALARS, lambda children: st.lists(children, max_size=4)
                     | st.dictionaries(_WORDS, children, max_size=4), max_leaves=16)


def _slots(value: Any, found: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) pair in a JSON value."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((value, key))
        _slots(child, found)
    return found


def _retyped(value: Any) -> list[Any]:
    return [str(value), [value], {"value": value}, None, True, 1.5, -1, 0, 2**64, 10**30, float("nan")]


@st.composite
def _mutated(draw: st.DrawFn, original: dict[str, Any]) -> dict[str, Any]:
    """``original`` with one to three changes: a key dropped, a value given another type, or replaced by random JSON."""
    document = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(document, [])
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        action = draw(st.sampled_from(["drop", "retype", "replace", "add"]))
        if action == "drop":
            del container[key]
        elif action == "retype":
            container[key] = draw(st.sampled_from(_retyped(container[key])))
        elif action == "replace":
            container[key] = draw(_JSON)
        elif isinstance(container, dict):
            container[draw(_WORDS)] = draw(_JSON)
        else:
            container.append(draw(_JSON))
    return document


@pytest.fixture(scope="module")
def model_parts(base: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return _tensors_and_document(base / "model.safetensors")


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_load_model_reads_any_document_or_raises_model_file_error(model_parts, tmp_path: Path, data: st.DataObject) -> None:
    tensors, valid = model_parts
    document = data.draw(_mutated(valid) | _JSON | st.dictionaries(_WORDS, _JSON).map(lambda d: {"format": 1, **d}))
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"vaeeval": json.dumps(document)})
    try:
        load_model(path)
    except ModelFileError:
        event("refused")
    else:
        event("read")


_DESCRS = st.sampled_from(["<f4", "<f8", "|b1", "<i8", "|u1", "<f2", ">f4", "|O", "<U3", "|V8", "<c8", "<M8[s]", "foo", "",
                           "<f4x", "S0"]) | st.text(max_size=5) | st.just([("a", "<f4")])
_DIMENSIONS = st.integers(-3, 40) | st.integers(-(2**70), 2**70) | st.sampled_from([0, 6, 2**31, 2**63, 2**64])


@st.composite
def _npy_files(draw: st.DrawFn) -> bytes:
    header = {"descr": draw(_DESCRS), "fortran_order": draw(st.booleans() | st.sampled_from([0, 1, None, "yes"])),
              "shape": draw(st.lists(_DIMENSIONS, max_size=4).map(tuple) | st.sampled_from([(3, 6), (1, 6), [3, 6], "(3, 6)"]))}
    if draw(st.booleans()):
        header.pop(draw(st.sampled_from(sorted(header))))
    if draw(st.booleans()):
        header[draw(st.text(max_size=5))] = draw(_SCALARS)
    text = repr(header) if draw(st.integers(0, 9)) else draw(st.text(max_size=40))
    version = draw(st.sampled_from([1, 2, 3]))
    raw = _npy_header(text, version)
    return raw + draw(st.binary(max_size=300) | st.sampled_from([b"\0" * 200, b"\1" * 200]))


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(content=_npy_files(), as_npz=st.booleans(), limit=st.none() | st.integers(1, 3))
def test_load_data_reads_any_npy_or_raises_data_error(base, tmp_path: Path, content: bytes, as_npz: bool,
                                                      limit: int | None) -> None:
    model = load_model(base / "model.safetensors")
    path = _npz_with(tmp_path / "d.npz", {"x.npy": content}) if as_npz else _write_bytes(tmp_path / "d.npy", content)
    try:
        dataset = load_data(path, model, limit=limit, max_data_size=1 << 20)
    except DataError:
        event("refused")
        return
    event("read")
    assert dataset.array.shape[1:] == (D,) and 1 <= dataset.n


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_read_stream_reads_any_lines_after_a_header_or_raises_its_error(base, tmp_path: Path, data: st.DataObject) -> None:
    lines = _lines(base / "run.jsonl")
    header, points, summary = lines[0], [json.loads(line) for line in lines[1:-1]], json.loads(lines[-1])
    line = _JSON | _mutated(points[0]) | _mutated(summary)
    body = data.draw(st.lists(line, max_size=4))
    kept = data.draw(st.integers(0, len(points)))
    text = "\n".join([header, *map(json.dumps, points[:kept]), *map(json.dumps, body)]) + "\n"
    path = tmp_path / "r.jsonl"
    path.write_text(text)
    try:
        read_stream(path)
    except VaeevalError:
        event("refused")
    else:
        event("read")
