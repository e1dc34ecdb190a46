"""The user's files: reading them with one-line errors, and fingerprinting them.

Digests are taken where files are loaded, once, so every document that names
a file carries the same fingerprint of what was actually read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vaeeval.errors import DataError, ModelFileError

_READ_BLOCK = 1 << 22


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


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_BLOCK), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
