"""The progress bar on stderr: shown once a run has taken a second, and only on a terminal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ProgressBar:
    """A rich progress bar on stderr that appears only once a run has taken a second, and only on a terminal.

    Call it with the amount of work done so far; use it as a context manager. Into a
    file or a pipe it writes nothing (rich would leave a blank line behind). rich is
    imported only when the second has passed: a short or ``--json`` run never loads it.
    """

    def __init__(self, total: int, label: str, console: Callable[[], Any], delay: float = 1.0) -> None:
        self.total, self.label, self.console, self.delay = total, label, console, delay
        self.started = time.monotonic()
        self.progress: Any = None
        self.task = None
        self.checked = False  # whether the console was asked if it is a terminal

    def __call__(self, done: int) -> None:
        if not self.checked and time.monotonic() - self.started >= self.delay:
            self.checked = True
            console = self.console()
            if console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
                self.progress.start()
                self.task = self.progress.add_task(self.label, total=self.total)
        if self.progress is not None:
            self.progress.update(self.task, completed=done)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.stop()
