"""The user's code, which ``--arch`` runs: calling it, and reporting its failures in one line naming where."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vaeeval.errors import VaeevalError
from vaeeval.user.checks import Refused, device_of, returned

# What the user's code may raise that vaeeval reports in one line: any exception, and sys.exit() (a SystemExit,
# which is no Exception: uncaught, sys.exit(0) in decode would end vaeeval with success and nothing printed).
# KeyboardInterrupt is left alone: ctrl-C stops vaeeval as ever.
USER_FAILURES = (Exception, SystemExit)


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def where(error: BaseException) -> str:
    """`` at file.py:12 (expression)``: the last frame of the traceback outside vaeeval and torch, if any."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = str(Path(__file__).parent)
    for frame in reversed(frames):
        if not frame.filename.startswith(ours) and "/torch/" not in frame.filename and "<" not in frame.filename[:1]:
            code = f" ({frame.line.strip()})" if frame.line else ""
            return f" at {frame.filename}:{frame.lineno}{code}"
    return ""


def call_user(what: str, function: Callable[..., Any], *args: Any, integers: bool = False) -> Any:
    """``function(*args)``: the user's code; whatever it raises becomes one ``VaeevalError`` naming the call,
    the exception, and the file and line it came from. What it returns is checked (``checks.returned``: real
    floating tensors and parameters, on the device of the first tensor given; ``integers``: a tensor returned may
    hold integers, a discrete distribution's draws); a refusal is one ``VaeevalError`` too, ``what: why``."""
    try:
        return returned(what, function(*args), device_of(args), integers=integers)
    except VaeevalError:
        raise
    except Refused as error:  # vaeeval's own check of what came back (also from inside, a log_prob's result)
        raise VaeevalError(f"{what}: {error}" if not str(error).startswith(what) else str(error)) from None
    except USER_FAILURES as error:  # the user's code: any failure is reported, in one line
        raise VaeevalError(f"{what} raised {first_line(error)}{where(error)}") from None
