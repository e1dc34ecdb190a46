"""``--plot FILE.png``: the K-convergence curve and the histogram of per-point log p(x).

matplotlib is an optional extra (``pip install 'vaeeval[plot]'``), imported only here. The figure
is drawn through matplotlib's object interface, never pyplot, so no backend is
chosen or switched for the process (a notebook's stays as it was).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from vaeeval.errors import VaeevalError, option
from vaeeval.io.files import atomic_write, check_output, writing
from vaeeval.results.numbers import Evaluation


def _formats() -> dict[str, str]:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise VaeevalError(f"{option('plot')} needs matplotlib: pip install 'vaeeval[plot]'") from None
    return FigureCanvasBase.get_supported_filetypes()


def check_plot(path: str | Path, inputs: Iterable[Path | None]) -> None:
    """Refuse a plot file matplotlib cannot write (by its suffix), an input, or one in a missing directory.

    Raises:
        VaeevalError: naming the problem, before anything is computed.
    """
    path = Path(path)
    formats = _formats()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        known = ", ".join(f".{name}" for name in sorted(formats))
        raise VaeevalError(f"{option('plot')} {path}: give a file name ending in one of {known}")
    check_output(path, inputs, parameter="plot")


def plot_diagnostics(evaluation: Evaluation, path: str | Path) -> Path:
    """Draw IWAE against K (mean ± stderr) and the per-point IWAE histogram, unreliable points marked.

    Raises:
        VaeevalError: matplotlib is not installed, or the file cannot be written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise VaeevalError(f"{option('plot')} needs matplotlib: pip install 'vaeeval[plot]'") from None
    path = Path(path)
    figure = Figure(figsize=(11, 4))
    curve, histogram = figure.subplots(1, 2)
    steps = evaluation.convergence.summary()
    ks = [k for k, _ in steps]
    means = np.array([stat.mean for _, stat in steps])
    errors = np.array([stat.stderr or 0.0 for _, stat in steps])
    curve.errorbar(ks, means, yerr=errors, marker="o", capsize=3)
    curve.set_xscale("log")
    curve.set_xlabel("K, importance samples (the first K of the same samples)")
    curve.set_ylabel(f"mean IWAE ({evaluation.measure}, nats)")
    curve.set_title("Has the estimate stopped moving?")

    points = evaluation.points
    bins = np.histogram_bin_edges(points.iwae, bins=40)
    histogram.hist(
        [points.iwae[~points.unreliable], points.iwae[points.unreliable]],
        bins=bins,
        stacked=True,
        color=["tab:blue", "tab:red"],
        label=["reliable", "unreliable (k-hat)"],
    )
    histogram.set_xlabel(f"per-point IWAE estimate of log p(x) ({evaluation.measure}, nats)")
    histogram.set_ylabel("points")
    histogram.legend()
    figure.tight_layout()
    with writing(path, "plot"), atomic_write(path, "wb") as handle:
        figure.savefig(handle, format=path.suffix.lower().lstrip(".") or "png", dpi=100)
    return path
