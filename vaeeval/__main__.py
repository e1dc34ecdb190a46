"""``python -m vaeeval`` and the ``vaeeval`` command: the CLI, interruptible from the first instant."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# what libgomp (torch's OpenMP runtime) prints, and goes on, for an OMP_* or GOMP_* setting it cannot read
_REFUSED_BY_OPENMP = re.compile(rb"libgomp: (?:Invalid|Unknown) value for environment variable ([A-Z_]+)")


def main() -> None:
    """Import the command line (torch takes a moment) and run it; Ctrl-C meanwhile exits 130, not a traceback.

    Importing torch creates millions of long-lived objects, and the cyclic garbage collector
    would walk them all several times meanwhile (a third of the start-up time, measured):
    it is paused for the imports, and what they made is frozen out of later collections.
    """
    _check_thread_setting()
    gc.disable()
    try:
        with _native_warnings_refused():
            from vaeeval.cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("vaeeval: interrupted\n")
        sys.exit(130)
    finally:
        gc.freeze()
        gc.enable()
    command()


def _check_thread_setting() -> None:
    """OMP_NUM_THREADS must be a positive whole number where it is set: torch's OpenMP runtime (libgomp) reads it
    when torch loads and, for 0, -1 or text, prints its own warning and goes on, so a refusal of vaeeval's would
    be three lines. Refused here, before torch loads, in one line, exit 2."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is None:
        return
    if not all(part.strip().isdigit() and int(part) > 0 for part in value.split(",")):
        sys.stderr.write(f"vaeeval: error: OMP_NUM_THREADS={value!r} is not a positive whole number of threads; "
                         "unset it, or set it to one (OMP_NUM_THREADS=2)\n")
        sys.exit(2)


@contextlib.contextmanager
def _native_warnings_refused() -> Iterator[None]:
    """Run the imports (torch's native libraries read their environment variables as they load) with the
    process's stderr held in a file: a setting libgomp cannot read (OMP_PROC_BIND=abc, OMP_WAIT_POLICY=...,
    about twenty variables, each with its own rules) is refused in one line, exit 2, by libgomp's own
    judgement; anything else they printed is passed on as it was."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            printed = held.read()
        found = _REFUSED_BY_OPENMP.search(printed)
        if found:
            name = found.group(1).decode()
            sys.stderr.write(f"vaeeval: error: {name}={os.environ.get(name, '')!r} is a setting torch's OpenMP runtime "
                             f"(libgomp) cannot read; unset it, or give it a value libgomp documents\n")
            sys.exit(2)
        if printed:
            sys.stderr.buffer.write(printed)
            sys.stderr.flush()


if __name__ == "__main__":
    main()
