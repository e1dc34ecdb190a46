"""``python -m vaeeval`` and the ``vaeeval`` command: the CLI, interruptible from the first instant."""

from __future__ import annotations

import gc
import os
import sys


def main() -> None:
    """Import the command line (torch takes a moment) and run it; Ctrl-C meanwhile exits 130, not a traceback.

    Importing torch creates millions of long-lived objects, and the cyclic garbage collector
    would walk them all several times meanwhile (a third of the start-up time, measured):
    it is paused for the imports, and what they made is frozen out of later collections.
    """
    _check_thread_setting()
    gc.disable()
    try:
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


if __name__ == "__main__":
    main()
