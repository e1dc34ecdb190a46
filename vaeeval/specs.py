"""Checks shared by every reader of a format-1 document: tensors named by a key, levels, counts.

Each raises ``SpecError`` with a message that starts with where the value sits
(``prior: means``, ``decoder layer 2 (linear "decoder.2"):``); ``load_model``
adds the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vaeeval.errors import SpecError

if TYPE_CHECKING:
    import torch


def named_tensor(tensors: Mapping[str, torch.Tensor], name: Any, where: str, *, finite: bool = False) -> torch.Tensor:
    """The file's tensor ``name``, which ``where`` refers to.

    Raises:
        SpecError: no such tensor (or, with ``finite``, one holding NaN or infinity).
    """
    if not isinstance(name, str) or name not in tensors:
        raise SpecError(f"{where} names tensor {name!r}, which the file does not have")
    tensor = tensors[name]
    if finite and not tensor.isfinite().all():
        raise SpecError(f"{where} tensor {name!r} has non-finite values")
    return tensor


def is_integer(value: Any, minimum: int) -> bool:
    """A JSON integer (not a boolean) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def levels(value: Any, where: str) -> int:
    """A number of levels, an integer >= 2.

    Raises:
        SpecError: anything else.
    """
    if not is_integer(value, 2):
        raise SpecError(f"{where} needs \"levels\", an integer >= 2, found {value!r}")
    return int(value)
