"""The user's files: read only what is a regular file, never write over an input, write whole files atomically.

Every file vaeeval reads (a model, data, a results file) must be a regular file:
a FIFO, a device or a directory is refused before it is opened, so nothing
blocks or reads without end. A file vaeeval writes whole (a converted model, a
merged results file, a plot, simulated data) is written to a temporary file in
the same directory and renamed over the target only when complete, so an
interruption never leaves half a file, and a target that is one of the inputs
(the same file, whatever the path or link) is refused. Results files that grow
point by point are locked for the life of a run (``locked``). Digests are taken
where files are loaded, once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import IO, Any

from vaeeval.errors import DataError, ModelFileError, VaeevalError, option

_READ_BLOCK = 1 << 22
MAX_JSON_DEPTH = 64  # vaeeval's own documents nest about 6 deep


@contextlib.contextmanager
def guarded(path: Path, what: str) -> Iterator[None]:
    """Whatever a third-party reader (h5py, anndata, Pillow, pyarrow) raises on a file's content is one
    ``DataError`` naming the file: ``what (its first line)``."""
    try:
        yield
    except VaeevalError:
        raise
    except Exception as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(path, f"{what} ({text})") from None


@contextlib.contextmanager
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


def _what(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def regular_file(path: Path, error: type[ModelFileError] | type[DataError], kind: str) -> os.stat_result:
    """``path``'s status, refusing anything but a regular file (following links) before it is opened.

    Raises:
        ``error``: missing, unreadable, or a directory, FIFO, socket or device.
    """
    with reading(path, error, kind):
        status = path.stat()
    if not stat.S_ISREG(status.st_mode):
        raise error(path, f"is {_what(status.st_mode)}, not a {kind}")
    return status


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_BLOCK), b""):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def json_depth(text: str | bytes) -> int:
    """How deep arrays and objects nest in a JSON text (outside strings), in one pass."""
    data = text.encode() if isinstance(text, str) else text
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def load_json(text: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for JSON as the standard defines it, read safely.

    Refused: nesting deeper than ``max_depth`` (Python's parser recurses), NaN and
    infinities (not JSON, and never written by vaeeval), and integers of more than
    ``_INTEGER_DIGITS`` digits (no count or index is that large).

    Raises:
        json.JSONDecodeError: not JSON.
        ValueError: any of the above; the message starts with ``where``.
    """
    depth = json_depth(text)
    if depth > max_depth:
        raise ValueError(f"{where} nests {depth} levels deep; at most {max_depth} are read")
    return json.loads(text, parse_constant=partial(_not_json, where), parse_int=partial(_integer, where))


_INTEGER_DIGITS = 4000  # Python refuses to read integers of more than 4300 digits anyway, less clearly


def _not_json(where: str, constant: str) -> Any:
    raise ValueError(f"{where} holds {constant}, which is not a JSON number")


def _integer(where: str, text: str) -> int:
    if len(text.lstrip("-")) > _INTEGER_DIGITS:
        raise ValueError(f"{where} holds an integer of {len(text)} digits; none that large is read")
    return int(text)


# ---------------------------------------------------------------- writing


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: Path, inputs: Iterable[Path | None], *, parameter: str = "output") -> None:
    """Refuse an output that is one of the inputs (compared by ``os.path.samefile``: links count),
    or whose directory does not exist or cannot be written.

    Raises:
        VaeevalError: naming the parameter and the file.
    """
    for source in inputs:
        if source is not None and _same_file(path, source):
            raise VaeevalError(f"{option(parameter)} {path} is the input {source}; vaeeval never writes over its inputs")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise VaeevalError(f"{option(parameter)} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VaeevalError(f"{option(parameter)} {path}: the directory {folder} cannot be written (permission denied)")
    if path.is_dir():
        raise VaeevalError(f"{option(parameter)} {path} is a directory; give a file name")
    if path.exists() and not path.is_file():
        raise VaeevalError(f"{option(parameter)} {path} is {_what(path.stat().st_mode)}, not a file vaeeval can write")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write ``path`` whole or not at all: a temporary file in its directory, renamed over it when complete.

    On any error (or Ctrl-C) the temporary file is removed and ``path`` is as it was.
    """
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    try:
        with os.fdopen(descriptor, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write and check a file at; renamed to ``path`` when the block
    ends without error, removed otherwise (``path`` is then as it was)."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    os.close(descriptor)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def writing(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    """Turn the OS errors of writing ``path`` into a one-line ``VaeevalError``."""

    @contextlib.contextmanager
    def translate() -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise VaeevalError(f"{path}: cannot write the {what} ({error.strerror or error})") from None

    return translate()


# ---------------------------------------------------------------- locking


class Locked(VaeevalError):
    """Another process holds the lock on a results file."""


@contextlib.contextmanager
def locked(path: Path, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``path`` for the life of a run.

    The lock is taken on ``<path>.lock``, which records the holder's pid for the
    message a second run gets; it is removed when the run ends.

    Args:
        path: the results file.
        wait: wait for the holder to finish instead of refusing.

    Raises:
        Locked: another process holds the lock (and ``wait`` is false).
    """
    lock_path = path.with_name(path.name + ".lock")
    handle = _acquire(lock_path, path, wait)
    try:
        try:
            os.ftruncate(handle.fileno(), 0)
            pid = str(os.getpid()).encode()
            while pid:  # a write may take only part of it
                pid = pid[os.write(handle.fileno(), pid):]
        except OSError as error:  # a full disk: the lock is ours, so no other run is using the file it names
            with contextlib.suppress(OSError):
                lock_path.unlink()
            raise VaeevalError(f"{lock_path}: cannot write the lock file ({error.strerror or error})") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def _acquire(lock_path: Path, path: Path, wait: bool) -> IO[str]:
    """The open, locked lock file. A holder removes it when done, so a lock won on a file that is no
    longer at ``lock_path`` is let go and taken again on the new one."""
    while True:
        with writing(lock_path, "lock file"):
            if lock_path.is_symlink() or (lock_path.exists() and not lock_path.is_file()):
                raise VaeevalError(f"{lock_path} is not a lock file vaeeval made (a link or a special file); remove it")
            created = not lock_path.exists()
            descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            handle = os.fdopen(descriptor, "r+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(handle.fileno(), 32, 0).strip()  # a pid, as vaeeval writes it; anything else is not shown
            handle.close()
            raise Locked(
                f"{path} is in use by another vaeeval run (pid {holder.decode() if holder.isdigit() else 'unknown'}); "
                f"wait for it to finish, "
                f"or pass {option('wait')} to wait"
            ) from None
        except OSError as error:  # ENOLCK, EOPNOTSUPP: a file system that cannot lock (some network ones)
            handle.close()
            if created:
                with contextlib.suppress(OSError):
                    lock_path.unlink()
            raise VaeevalError(
                f"{lock_path}: cannot be locked ({error.strerror or error}); on a file system without locks two runs "
                f"could write {path.name} at once: give {option('output')} a path on a local disk"
            ) from None
        try:
            current = os.stat(lock_path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            return handle
        handle.close()
