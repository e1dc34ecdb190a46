"""The ``vaeeval`` command line: parse, make one library call, render, map errors to exit codes.

Exit codes: 0 success; 1 the run worked but a requested check failed; 2 bad
input (a file, an option, the data), reported as one line on stderr; 130
interrupted. The library names its parameters (``samples``); here they become
the flags a user typed (``--samples``).
"""

from vaeeval.cli.group import main

__all__ = ["main"]
