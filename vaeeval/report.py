"""Results -> rich tables for people, JSON-ready dicts for programs.

Nothing here computes an estimate; it only lays out what ``evaluate`` and
``load_model`` found. JSON keys named in the issue tracker and the README
(``schema``, ``model``, ``data``, ``settings``, ``summary``, ``points`` and the
metric names) are a contract: add keys, never rename them.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from vaeeval.data import Dataset
from vaeeval.evaluate import METRICS, Evaluation, Stat
from vaeeval.layers import format_shape
from vaeeval.likelihoods import DENSITY
from vaeeval.model import Model

ELBO_SCHEMA = "vaeeval.elbo/1"
INSPECT_SCHEMA = "vaeeval.inspect/1"

_MEANINGS = {
    "elbo": "ELBO = recon - KL, a lower bound on log p(x)",
    "recon": "E_q[log p(x|z)], the reconstruction term",
    "kl": "KL(q(z|x) || p(z))",
    "iwae": "importance-weighted estimate of log p(x)",
}


def to_json(document: dict[str, Any]) -> str:
    """Serialize a document; NaN and infinity are refused, never written."""
    return json.dumps(document, indent=2, allow_nan=False)


def _stat(stat: Stat) -> dict[str, float | None]:
    return {"mean": stat.mean, "stderr": stat.stderr}


def model_info(model: Model) -> dict[str, Any]:
    """What a document says about the model."""
    return {
        "path": str(model.path) if model.path else None,
        "format": 1,
        "description": model.description,
        "family": model.likelihood.family,
        "likelihood": model.likelihood.spec,
        "measure": model.likelihood.measure,
        "prior": model.prior.spec,
        "kl": model.prior.kl_kind,
        "latent_dim": model.latent_dim,
        "input_shape": list(model.input_shape),
        "dims": model.data_dims,
        "domain": model.domain.to_spec() if model.domain else None,
        "parameters": model.parameter_count,
    }


def data_info(dataset: Dataset) -> dict[str, Any]:
    """What a document says about the data."""
    return {
        "path": str(dataset.path) if dataset.path else None,
        "key": dataset.key,
        "n": dataset.n,
        "total": dataset.total,
        "shape": list(dataset.array.shape),
        "dims": dataset.dims,
    }


def elbo_document(evaluation: Evaluation, model: Model, dataset: Dataset) -> dict[str, Any]:
    """The ``vaeeval elbo --json`` document (schema ``vaeeval.elbo/1``)."""
    summary, settings, points = evaluation.summary, evaluation.settings, evaluation.points
    columns = {name: getattr(points, name).tolist() for name in METRICS}
    return {
        "schema": ELBO_SCHEMA,
        "units": "nats per data point; higher is better (kl: lower)",
        "model": model_info(model),
        "data": data_info(dataset),
        "settings": {
            "samples": settings.samples,
            "seed": settings.seed,
            "batch_size": settings.batch_size,
            "chunk_size": settings.chunk_size,
            "device": settings.device,
        },
        "summary": {
            "n": summary.n,
            "measure": evaluation.measure,
            "kl_kind": evaluation.kl_kind,
            **{name: _stat(getattr(summary, name)) for name in METRICS},
            "bits_per_dim": _stat(summary.bits_per_dim),
        },
        "points": [
            {"index": int(index), **{name: columns[name][row] for name in METRICS}}
            for row, index in enumerate(points.index.tolist())
        ],
    }


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _measure_note(model: Model) -> str:
    family = model.likelihood.family
    if model.likelihood.measure == DENSITY:
        return (
            f"recon and iwae are log-densities ({family}, nats w.r.t. Lebesgue measure): "
            "comparable only with densities of the same data, never with probabilities"
        )
    return f"recon and iwae are log-probabilities of the data ({family}, nats)"


def _header(evaluation: Evaluation, model: Model, dataset: Dataset) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("model", escape(f"{model.path}"))
    if model.description:
        grid.add_row("", f"[dim]{escape(model.description)}[/]")
    grid.add_row("likelihood", f"{model.likelihood.family} ({model.likelihood.measure})")
    grid.add_row("prior", f"{model.prior.family}, KL {evaluation.kl_kind}")
    grid.add_row("latent dim", str(model.latent_dim))
    shown = f"{dataset.n} of {dataset.total}" if dataset.n != dataset.total else str(dataset.n)
    key = f" [{dataset.key}]" if dataset.key else ""
    grid.add_row("data", escape(f"{dataset.path}{key}: N = {shown} points, D = {model.data_dims} dims"))
    settings = evaluation.settings
    grid.add_row("samples", f"K = {settings.samples}, seed {settings.seed}, on {settings.device}")
    return grid


def _summary_table(evaluation: Evaluation, model: Model) -> Table:
    table = Table(title="Summary over points (nats per point)", title_justify="left", caption=_measure_note(model))
    table.add_column("metric", style="bold")
    table.add_column("mean", justify="right")
    table.add_column("stderr", justify="right")
    table.add_column("meaning")
    summary = evaluation.summary
    for name in METRICS:
        stat = getattr(summary, name)
        table.add_row(name, _num(stat.mean), _num(stat.stderr), escape(_MEANINGS[name]))
    table.add_row(
        "bits/dim",
        _num(summary.bits_per_dim.mean),
        _num(summary.bits_per_dim.stderr),
        f"-iwae / (D ln 2), D = {model.data_dims}",
    )
    return table


def _points_table(evaluation: Evaluation, show_all: bool, rows: int) -> Table:
    points = evaluation.points
    n = points.index.size
    if show_all or n <= 2 * rows:
        sections = [("", np.arange(n))]
        title = "Every point"
    else:
        worst = np.argsort(points.iwae, kind="stable")[:rows]
        sections = [("first", np.arange(rows)), ("worst", worst)]
        title = f"First {rows} and worst {rows} points by iwae (--all for every point)"
    table = Table(title=title, title_justify="left")
    for column in ("", "index", *METRICS):
        table.add_column(column, justify="right" if column else "left", style="dim" if not column else None)
    for label, rows_shown in sections:
        for position, row in enumerate(rows_shown):
            values = [_num(float(getattr(points, name)[row])) for name in METRICS]
            table.add_row(label if position == 0 else "", str(int(points.index[row])), *values)
        table.add_section()
    return table


def render_elbo(
    console: Console, evaluation: Evaluation, model: Model, dataset: Dataset, *, show_all: bool = False, rows: int = 5
) -> None:
    """Print the ``vaeeval elbo`` report: header, summary, per-point table."""
    console.print(_header(evaluation, model, dataset))
    console.print()
    console.print(_summary_table(evaluation, model))
    console.print()
    console.print(_points_table(evaluation, show_all, rows))


def inspect_document(model: Model) -> dict[str, Any]:
    """The ``vaeeval inspect --json`` document (schema ``vaeeval.inspect/1``)."""
    return {
        "schema": INSPECT_SCHEMA,
        "model": model_info(model),
        "layers": [
            {
                "part": layer.part,
                "index": layer.index,
                "type": layer.type,
                "detail": layer.detail,
                "output_shape": list(layer.out_shape),
                "parameters": layer.parameters,
            }
            for layer in model.layers
        ],
    }


def render_inspect(console: Console, model: Model) -> None:
    """Print the ``vaeeval inspect`` report."""
    table = Table(title=escape(f"{model.path}"), title_justify="left", caption=escape(model.description) or None)
    for column in ("part", "#", "type", "detail", "output shape", "parameters"):
        table.add_column(column, justify="right" if column in ("#", "parameters") else "left")
    table.add_row("input", "", "", "", format_shape(model.input_shape), "")
    part = "encoder"
    for layer in model.layers:
        if layer.part != part:
            table.add_section()
            part = layer.part
            table.add_row("latent", "", "", "", f"[{model.latent_dim}]", "")
        table.add_row(
            layer.part, str(layer.index), layer.type, layer.detail, format_shape(layer.out_shape), f"{layer.parameters:,}"
        )
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    likelihood = model.likelihood
    extra = {k: v for k, v in likelihood.spec.items() if k != "family"}
    facts.add_row(
        "likelihood",
        escape(f"{likelihood.family}{' ' + json.dumps(extra) if extra else ''}: P = {likelihood.params_per_dim} "
        f"output(s) per dimension, {likelihood.measure}, data {likelihood.support}"),
    )
    facts.add_row("prior", f"{model.prior.family}, KL {model.prior.kl_kind}")
    facts.add_row("data domain", model.domain.describe() if model.domain else "not declared")
    facts.add_row("parameters", f"{model.parameter_count:,}")
    console.print(Group(table, Text(), facts))


class ProgressBar:
    """A rich progress bar on stderr that appears only once a run has taken a second.

    Call it with the amount of work done so far; use it as a context manager.
    """

    def __init__(self, total: int, label: str, console: Console, delay: float = 1.0) -> None:
        self.total, self.label, self.console, self.delay = total, label, console, delay
        self.started = time.monotonic()
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, done: int) -> None:
        if self.progress is None and time.monotonic() - self.started >= self.delay:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
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
