"""The model class a folder ``save`` of scvi-tools wrote holds, read without running anything from it.

``model.pt`` is a torch checkpoint (a zip holding ``data.pkl``) whose ``attr_dict`` holds
the model's ``registry_``, and that its ``model_name`` (``SCVI``, ``SCANVI``, ``TOTALVI``,
...). torch's weights-only loader refuses the file (``var_names`` is a NumPy object array,
the history pandas frames), so the name is found by walking the pickle's opcodes
(``pickletools.genops`` parses, it never builds an object): the string pushed right after
the key ``model_name``, through the memo where the pickle refers back to an earlier string.
Nothing is imported or called from the file, and scvi-tools is not imported here.
"""

from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

from vaeeval.errors import VaeevalError

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PUTS = {"BINPUT", "LONG_BINPUT", "PUT"}
_GETS = {"BINGET", "LONG_BINGET", "GET"}
_MAX_PICKLE = 256 * 2**20  # the data.pkl of a checkpoint whose tensors are stored beside it: small

# scvi-tools classes whose folders convert refuses -> what to do instead.
WAY_FORWARD = {
    "SCANVI": "convert the SCVI model that SCANVI.from_scvi_model started from; SCANVI's cell label is a second "
    "latent variable, which format 1 cannot hold",
    "TOTALVI": "TOTALVI's protein counts have a likelihood (a mixture of two negative binomials) and a background "
    "latent of their own, which format 1 cannot hold",
}


def saved_model_name(checkpoint: Path) -> str | None:
    """The ``model_name`` in ``checkpoint``'s pickled attributes, or None where it has none (or is no torch zip)."""
    try:
        with zipfile.ZipFile(checkpoint) as archive:
            names = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
            if len(names) != 1 or archive.getinfo(names[0]).file_size > _MAX_PICKLE:
                return None
            data = archive.read(names[0])
    except (OSError, zipfile.BadZipFile):
        return None
    memo: dict[int, object] = {}
    pushed: object = None  # what the last opcode pushed, where it matters here (strings)
    after_key = False
    try:
        for opcode, argument, _ in pickletools.genops(data):
            name = opcode.name
            if name in _PUTS or name == "MEMOIZE":
                memo[argument if name in _PUTS else len(memo)] = pushed
                continue
            value = argument if name in _STRINGS else memo.get(argument) if name in _GETS else None
            if after_key and isinstance(value, str):
                return value
            after_key = value == "model_name"
            pushed = value
    except ValueError:  # not a pickle genops can read
        return None
    return None


def check_scvi_class(folder: Path) -> None:
    """Refuse, in one line, a folder whose ``model.pt`` names a model class other than SCVI.

    Raises:
        VaeevalError: another class (named, with the way forward), or no class name to read.
    """
    found = saved_model_name(folder / "model.pt")
    if found == "SCVI":
        return
    if found is None:
        raise VaeevalError(
            f"{folder}: its model.pt names no model class vaeeval can read without unpickling it (no registry model_name); "
            "vaeeval reads the folders SCVI.save writes"
        )
    way = WAY_FORWARD.get(found, f"{found} is not an SCVI, whose module is the only one format 1 holds")
    raise VaeevalError(
        f"convert --from scvi: {folder} holds a {found} model (its saved registry says so); vaeeval converts SCVI models: {way}"
    )
