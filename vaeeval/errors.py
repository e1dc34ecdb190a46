"""The errors vaeeval raises for bad input.

Every message is one line a user can act on: what is wrong, where, what was
expected and what was found. The CLI prints it and exits with code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class VaeevalError(Exception):
    """A problem with what the user gave vaeeval (a file, an option, data)."""


class ModelFileError(VaeevalError):
    """The model file cannot be read, or breaks format 1."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataError(VaeevalError):
    """The data file cannot be read, or does not fit the model."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = path
        self.reason = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class SpecError(ValueError):
    """A part of a format-1 document is invalid.

    Raised by the layer, likelihood and prior registries, which do not know the
    file they are reading; ``load_model`` adds the path and re-raises it as a
    ``ModelFileError``.
    """


@contextmanager
def reading(path: Path, error: type[ModelFileError] | type[DataError], kind: str) -> Iterator[None]:
    """Turn the OS errors of opening and reading ``path`` into one-line errors of class ``error``.

    Args:
        path: the file being read.
        error: the error class to raise.
        kind: what the file should be, for "is a directory, not a <kind>".
    """
    try:
        yield
    except FileNotFoundError:
        raise error(path, "no such file") from None
    except IsADirectoryError:
        raise error(path, f"is a directory, not a {kind}") from None
    except PermissionError:
        raise error(path, "cannot be read (permission denied)") from None
    except OSError as os_error:
        raise error(path, f"cannot be read ({os_error.strerror or os_error})") from None
