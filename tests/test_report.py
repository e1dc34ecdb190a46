"""Rendering: JSON never carries NaN, the progress bar waits a second and stays off stdout."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console

from vaeeval.output.records import to_json
from vaeeval.output.tables import ProgressBar


def test_json_refuses_nan_and_infinity():
    with pytest.raises(ValueError):
        to_json({"x": math.nan})
    with pytest.raises(ValueError):
        to_json({"x": -math.inf})


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=100), buffer


def test_progress_bar_appears_after_its_delay():
    console, buffer = _console()
    with ProgressBar(10, "evaluating points", console, delay=0.0) as progress:
        progress(5)
        progress(10)
    assert "evaluating points" in buffer.getvalue()


def test_short_runs_show_no_progress_bar():
    console, buffer = _console()
    with ProgressBar(10, "evaluating points", console, delay=3600.0) as progress:
        progress(10)
    assert buffer.getvalue() == ""
