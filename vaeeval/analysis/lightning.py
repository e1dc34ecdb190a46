"""Weights out of a PyTorch Lightning ``.ckpt`` (or a torch-saved state dict): ``vaeeval convert --from lightning``.

The checkpoint is read by torch's weights-only loader (``torch.load(weights_only=True)``),
which rebuilds tensors, containers and numbers and refuses any other object: nothing in
it runs. Only its ``state_dict`` is used (a file that is itself a state dict is used
whole), tensors only. A LightningModule usually holds the VAE as an attribute
(``self.vae``), so its keys carry a prefix (``vae.fc1.weight``); when every key of the
user's class (``--arch``) is found under one prefix, that prefix is stripped and the
tensors outside it (a loss's, a discriminator's) are left out, and both are said.

The result is written as format 1 through ``analysis.convert`` (verified number for
number) from ``checkpoint_model``, or with ``state_dict_only`` as a safetensors state dict, the weights ``--arch``
reads.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vaeeval.errors import ModelFileError, VaeevalError, listing, option
from vaeeval.format.model import Model
from vaeeval.io.files import reading, regular_file, staged, writing
from vaeeval.user.arch import ArchOptions, arch_model, build_module, load_architecture, load_state

SAFE_TORCH = (2, 6)  # before 2.6, torch.load(weights_only=True) could be made to run code (CVE-2025-32434)
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


@dataclass(frozen=True)
class Extracted:
    """A checkpoint's tensors for the user's class: ``tensors`` by the class's own keys."""

    path: Path
    tensors: dict[str, torch.Tensor]
    prefix: str  # stripped from every key ("" when none was)
    left_out: tuple[str, ...]  # the checkpoint's tensors outside the class's keys
    lightning: bool  # read from a Lightning checkpoint's "state_dict" (else the file was a state dict)

    def describe(self) -> str:
        """``read vae.ckpt's state_dict: 10 tensors, prefix 'vae.' stripped; left out 2 (loss.w, ...)``."""
        where = f"{self.path.name}'s state_dict" if self.lightning else str(self.path.name)
        stripped = f", prefix {self.prefix!r} stripped" if self.prefix else ""
        left = f"; left out {len(self.left_out)} outside it ({listing(self.left_out, 4, counted=True)})" if self.left_out else ""
        return f"read {where} with torch's weights-only loader: {len(self.tensors)} tensors{stripped}{left}"


def torch_is_safe(version: str | None = None) -> bool:
    """Whether ``torch.load(weights_only=True)`` of this torch version (default: the one installed) runs nothing from the file."""
    numbers = re.match(r"(\d+)\.(\d+)", torch.__version__ if version is None else version)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) >= SAFE_TORCH


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a checkpoint's ``state_dict`` (or of a file that is a state dict), and whether it was Lightning's.

    Raises:
        ModelFileError: a torch too old to load safely; a file the weights-only loader refuses
            (it holds other objects) or cannot read; no state dict of tensors in it.
    """
    path = Path(path)
    regular_file(path, ModelFileError, "checkpoint")
    if not torch_is_safe():
        raise ModelFileError(path, f"torch {torch.__version__} cannot read a checkpoint safely (its weights-only loader could "
                             f"run code before {SAFE_TORCH[0]}.{SAFE_TORCH[1]}, CVE-2025-32434); pip install 'torch>=2.6'")
    with reading(path, ModelFileError, "checkpoint"):
        try:
            loaded = _load(path)
        except pickle.UnpicklingError as error:
            found = _UNSUPPORTED.search(str(error))
            what = f"a Python object ({found[1]})" if found else "Python objects"
            raise ModelFileError(
                path, f"holds {what} that torch's weights-only loader refuses (vaeeval never unpickles objects); save the "
                "weights from your code: safetensors.torch.save_file(module.vae.state_dict(), 'weights.safetensors')"
            ) from None
        except OSError:
            raise  # reading() says it in one line
        except Exception as error:  # whatever torch's reader makes of a broken file
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelFileError(path, f"not a readable torch checkpoint ({text})") from None
    lightning = isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping)
    state = loaded["state_dict"] if lightning else loaded
    if not isinstance(state, Mapping):
        raise ModelFileError(path, f"holds a {type(state).__name__}, not a state dict (nor a Lightning checkpoint's 'state_dict')")
    tensors = {name: tensor for name, tensor in state.items() if isinstance(name, str) and isinstance(tensor, torch.Tensor)}
    if not tensors:
        keys = listing([str(key) for key in state], 6, counted=True) or "nothing"
        raise ModelFileError(path, f"holds no tensors by name (it has {keys}); a state dict maps names to tensors")
    return tensors, lightning


def _load(path: Path) -> Any:
    """``torch.load`` weights only; a zip-format file memory-mapped, so optimizer states and the rest stay on disk."""
    if zipfile.is_zipfile(path):
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    return torch.load(path, weights_only=True, map_location="cpu")  # the legacy format cannot be memory-mapped


def extract(path: str | Path, arch: ArchOptions) -> Extracted:
    """The checkpoint's tensors under the keys of ``arch``'s class (RUNS the user's code to build it), shapes checked.

    Raises:
        ModelFileError: as ``read_checkpoint``.
        VaeevalError: the class's keys are neither the checkpoint's nor under one prefix of
            them (or under several), or a tensor's shape differs from the class's.
    """
    path = Path(path)
    tensors, lightning = read_checkpoint(path)
    module = build_module(arch.spec, load_architecture(arch.spec), arch.args)
    wanted = list(module.state_dict())
    prefix = _prefix(path, tensors, wanted, arch.spec)
    chosen = {key: tensors[prefix + key] for key in wanted}
    load_state(module, chosen, path, arch.spec)  # every shape as the class has it
    taken = {prefix + key for key in wanted}
    return Extracted(path, chosen, prefix, tuple(name for name in tensors if name not in taken), lightning)


def _prefix(path: Path, tensors: Mapping[str, torch.Tensor], wanted: Sequence[str], spec: str) -> str:
    """The one prefix under which every key of the class is in the checkpoint ("" when they are there as they are)."""
    if not wanted:
        raise VaeevalError(f"{option('arch')} {spec}: the class has no parameters or buffers to read from {path}")
    if all(key in tensors for key in wanted):
        return ""
    first = wanted[0]
    candidates = {name[: -len(first)] for name in tensors if name.endswith("." + first)}
    fits = sorted(prefix for prefix in candidates if all(prefix + key in tensors for key in wanted))
    if len(fits) > 1:
        raise VaeevalError(f"{path}: every key of {option('arch')} {spec} is there under several prefixes ({listing(fits)}); "
                           f"save the one you mean: safetensors.torch.save_file(module.<name>.state_dict(), 'weights.safetensors')")
    if not fits:
        held = listing(list(tensors), 4, counted=True)
        raise VaeevalError(f"{path}: does not fit {option('arch')} {spec}: its keys ({listing(wanted, 3, counted=True)}) are not "
                           f"the checkpoint's, nor under one prefix of them; the checkpoint holds {held}")
    return fits[0]


def save_state_dict(extracted: Extracted, output: str | Path) -> Path:
    """Write the extracted tensors as a safetensors state dict, whole or not at all."""
    output = Path(output)
    tensors = {name: tensor.detach().contiguous() for name, tensor in extracted.tensors.items()}
    with writing(output, "state dict"), staged(output) as temporary:
        save_file(tensors, temporary, metadata={"source": extracted.path.name, "stripped_prefix": extracted.prefix})
    return output


def checkpoint_model(extracted: Extracted, arch: ArchOptions, input_shape: Sequence[int], beside: str | Path) -> Model:
    """The ``--arch`` model with the extracted weights (RUNS the user's code), recorded as read from the checkpoint:
    what ``analysis.convert.convert`` writes as format 1.

    The weights pass through a temporary safetensors file in the folder ``beside``, removed before this returns.
    """
    descriptor, temporary = tempfile.mkstemp(prefix=".vaeeval-", suffix=".weights.partial", dir=Path(beside))
    os.close(descriptor)
    try:
        save_state_dict(extracted, temporary)
        model = arch_model(temporary, replace(arch, encode_shape=None), input_shape)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
    return replace(model, path=extracted.path)
