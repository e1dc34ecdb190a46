"""The errors vaeeval raises for bad input.

Every message is one line a user can act on: what is wrong, where, what was
expected and what was found. The CLI prints it and exits with code 2.

A message names a parameter through ``option(name)``: a library caller reads
the parameter's name (``samples``), the command line its flag (``--samples``),
rendered by ``VaeevalError.render``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

_MARK = "\x00"
_OPTION = re.compile(f"{_MARK}([a-z_]+){_MARK}")


def option(name: str) -> str:
    """How a message names the parameter ``name``: as itself in the library, as its flag on the command line."""
    return f"{_MARK}{name}{_MARK}"


def listing(names: Sequence[object], most: int = 5, *, counted: bool = False) -> str:
    """``a, b, c, d, e ...``: the first ``most`` names, then an ellipsis (``counted``: "and 3 more")."""
    rest = len(names) - most
    tail = "" if rest <= 0 else f" and {rest} more" if counted else " ..."
    return ", ".join(map(str, names[:most])) + tail


def plain(text: str) -> str:
    """``text`` with each parameter ``option`` marked written as its name."""
    return _OPTION.sub(lambda match: match.group(1), text)


class VaeevalError(Exception):
    """A problem with what the user gave vaeeval (a file, an option, data)."""

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each parameter ``option`` marked written as ``name(parameter)``."""
        return _OPTION.sub(lambda match: name(match.group(1)), super().__str__())

    def __str__(self) -> str:
        return plain(super().__str__())


class ModelFileError(VaeevalError):
    """The model file cannot be read, or breaks format 1."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = path
        self.reason = plain(message)
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataError(VaeevalError):
    """The data file cannot be read, or does not fit the model."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = path
        self.reason = plain(message)
        super().__init__(f"{path}: {message}" if path is not None else message)


class SpecError(ValueError):
    """A part of a format-1 document is invalid.

    Raised by the layer, likelihood and prior registries, which do not know the
    file they are reading; ``load_model`` adds the path and re-raises it as a
    ``ModelFileError``.
    """

