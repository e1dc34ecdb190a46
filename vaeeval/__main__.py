"""``python -m vaeeval`` and the ``vaeeval`` command: the CLI, interruptible from the first instant."""

from __future__ import annotations

import sys


def main() -> None:
    """Import the command line (torch takes a moment) and run it; Ctrl-C meanwhile exits 130, not a traceback."""
    try:
        from vaeeval.cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("vaeeval: interrupted\n")
        sys.exit(130)
    command()


if __name__ == "__main__":
    main()
