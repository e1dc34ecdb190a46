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


LARGEST = 2**31 - 1  # no count, size or index in a model document is larger
MAX_LEVELS = 65536  # values per dimension of discrete data (16-bit images at most)


def is_integer(value: Any, minimum: int, maximum: int = LARGEST) -> bool:
    """A JSON integer (not a boolean) from ``minimum`` to ``maximum``."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def levels(value: Any, where: str) -> int:
    """A number of levels, an integer from 2 to ``MAX_LEVELS``.

    Raises:
        SpecError: anything else.
    """
    if not is_integer(value, 2, MAX_LEVELS):
        raise SpecError(f"{where} needs \"levels\", an integer from 2 to {MAX_LEVELS}, found {value!r}")
    return int(value)
