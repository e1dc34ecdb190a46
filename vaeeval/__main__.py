"""``python -m vaeeval`` and the ``vaeeval`` command: the CLI, interruptible from the first instant."""

from __future__ import annotations

import gc
import sys


def main() -> None:
    """Import the command line (torch takes a moment) and run it; Ctrl-C meanwhile exits 130, not a traceback.

    Importing torch creates millions of long-lived objects, and the cyclic garbage collector
    would walk them all several times meanwhile (a third of the start-up time, measured):
    it is paused for the imports, and what they made is frozen out of later collections.
    """
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


if __name__ == "__main__":
    main()
