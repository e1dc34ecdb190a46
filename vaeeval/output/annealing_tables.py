"""Rich tables of AIS and BDMC runs: the settings and cost, the summary, the points, the gap."""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vaeeval.format.terms import DENSITY
from vaeeval.output.tables import ais_settings_line, num, points_table
from vaeeval.results.numbers import GAP_LIMIT, AISCost, AISEvaluation, BDMCEvaluation
from vaeeval.results.sequences import sequence_rows


def _cost_line(cost: AISCost, seconds: float | None, n: int) -> str:
    timing = "" if seconds is None else f" in {seconds:.1f} s ({seconds / max(n, 1):.3f} s per point)"
    pilot = f", of which the pilot {100 * cost.pilot_share:.0f}%" if cost.pilot else ""
    return f"Cost: {cost.pilot + cost.run:,} decoder gradient evaluations per point{pilot}{timing}."


def render_ais(
    console: Console,
    evaluation: AISEvaluation,
    model: dict[str, Any],
    data: dict[str, Any],
    *,
    show_all: bool = False,
    seconds: float | None = None,
    rows: int = 5,
) -> None:
    """Print the ``vaeeval ais`` report: header, ELBO ≤ IWAE ≤ AIS side by side, cost, per-point table."""
    settings, summary = evaluation.settings, evaluation.summary
    grid = _header(model, evaluation)
    grid.add_row("prior", model["prior"]["family"])
    n, total = data["n"], data["total"]
    shown = f"{n} of {total}" if n != total else str(n)
    grid.add_row("data", escape(f"{data['path']}: N = {shown} points, D = {model['dims']} dims"))
    grid.add_row("annealing", ais_settings_line(settings, evaluation.cost, evaluation.points.from_prior))
    grid.add_row("beside", f"ELBO and IWAE from K = {settings.samples} importance samples of q(z|x)")
    console.print(grid)
    console.print()
    table = Table(title="Summary over points (nats per point)", title_justify="left",
                  caption=escape(f"every number is a log-{'density' if evaluation.measure == DENSITY else 'probability'}; "
                                 "E[elbo] ≤ E[iwae] ≤ E[ais] ≤ log p(x)"))
    for column in ("metric", "mean", "stderr", "meaning"):
        table.add_column(column, justify="left" if column in ("metric", "meaning") else "right")
    meanings = {
        "elbo": "evidence lower bound",
        "iwae": f"importance-weighted bound, K = {settings.samples}",
        "ais": f"annealed importance sampling, C = {settings.chains} chains",
    }
    for name, meaning in meanings.items():
        stat = getattr(summary, name)
        table.add_row(name, num(stat.mean), num(stat.stderr), meaning)
    table.add_row("ais − iwae", num(summary.gap.mean), num(summary.gap.stderr), "how far the IWAE estimate fell short")
    table.add_row("± ais", num(summary.ais_stderr.mean), "", "mean per-point standard error of ais (over chains)")
    table.add_row("acceptance", num(summary.acceptance.mean, 3), num(summary.acceptance.stderr, 3), "HMC acceptance rate")
    if summary.sequences is not None:  # padded sequences: per token, not per padded slot
        for label, stat, meaning in sequence_rows(summary.sequences):
            table.add_row(label, num(stat.mean), num(stat.stderr), escape(meaning))
    else:
        table.add_row("bits/dim", num(summary.bits_per_dim.mean), num(summary.bits_per_dim.stderr),
                      f"-ais / (D ln 2), D = {model['dims']}")
    console.print(table)
    console.print(_cost_line(evaluation.cost, seconds, summary.n))
    console.print()
    points = evaluation.points
    count = points.index.size
    if show_all or count <= 2 * rows:
        title, sections = "Every point", [("", np.arange(count))]
    else:
        largest = np.argsort(-(points.ais - points.iwae), kind="stable")[:rows]
        title = f"First {rows} points and the {rows} with the largest ais − iwae (--all for every point)"
        sections = [("first", np.arange(rows)), ("largest", largest)]
    columns = {
        "elbo": lambda row: num(float(points.elbo[row])),
        "iwae": lambda row: num(float(points.iwae[row])),
        "ais": lambda row: num(float(points.ais[row])),
        "± ais": lambda row: num(float(points.ais_stderr[row]), 3),
        "ais − iwae": lambda row: num(float(points.ais[row] - points.iwae[row]), 3),
        "acceptance": lambda row: num(float(points.acceptance[row]), 2),
        "mean ε": lambda row: num(float(points.step_size[row]), 4),
    }
    if settings.init == "auto" and points.from_prior is not None:
        columns["start"] = lambda row: "p(z)" if points.from_prior[row] else "q(z|x)"
    console.print(points_table(title, points.index, sections, columns))


def _header(model: dict[str, Any], evaluation: AISEvaluation | BDMCEvaluation) -> Table:
    """The first rows of an ais or bdmc report: the model, and what its numbers are."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("model", escape(f"{model['path']}"))
    grid.add_row("likelihood", f"{model['family']}, reported as {evaluation.scoring.label}")
    return grid


def render_bdmc(console: Console, evaluation: BDMCEvaluation, model: dict[str, Any], simulated: dict[str, Any],
                *, show_all: bool = False, seconds: float | None = None, rows: int = 5) -> None:
    """Print the ``vaeeval bdmc`` report: the sandwich lower ≤ log p(x) ≤ upper and its gap."""
    settings, summary = evaluation.settings, evaluation.summary
    grid = _header(model, evaluation)
    where = f"; saved to {simulated['saved']}" if simulated.get("saved") else ""
    grid.add_row("data", escape(f"{simulated['n']} points simulated from the model (z ~ p(z), x ~ p(x|z), seed "
                                f"{simulated['seed']}), {evaluation.domain.describe()}{where}"))
    grid.add_row("annealing", ais_settings_line(settings, evaluation.cost, evaluation.points.from_prior))
    console.print(grid)
    console.print()
    table = Table(title="Bidirectional Monte Carlo (nats per point)", title_justify="left",
                  caption=escape("E[lower] ≤ log p(x) ≤ E[upper]: forward AIS from q0, reverse AIS from the true z"))
    for column in ("metric", "mean", "stderr", "meaning"):
        table.add_column(column, justify="left" if column in ("metric", "meaning") else "right")
    table.add_row("lower", num(summary.lower.mean), num(summary.lower.stderr), "forward AIS: a stochastic lower bound")
    table.add_row("upper", num(summary.upper.mean), num(summary.upper.stderr),
                  "reverse AIS from the simulated z: a stochastic upper bound")
    table.add_row("gap", num(summary.gap.mean), num(summary.gap.stderr), "upper − lower: how far AIS can be from log p(x)")
    table.add_row("iwae", num(summary.iwae.mean), num(summary.iwae.stderr), f"K = {settings.samples}, for comparison")
    table.add_row("acceptance", num(summary.acceptance.mean, 3), num(summary.acceptance.stderr, 3), "HMC acceptance rate")
    console.print(table)
    console.print(_cost_line(evaluation.cost, seconds, summary.n))
    if evaluation.weak:
        console.print(
            f"[red]The gap is {summary.gap.mean:.2f} nats per point, above {GAP_LIMIT:g}[/]: these AIS settings are too "
            f"weak for this model; AIS estimates at them can be that far below log p(x). Try more steps "
            f"(--steps {4 * settings.steps}) or more leapfrog steps."
        )
    else:
        console.print(
            f"The gap is {summary.gap.mean:.3f} nats per point: at these settings AIS is within about that of log p(x) "
            "on data like the model's own."
        )
    points = evaluation.points
    count = points.index.size
    if show_all or count <= 2 * rows:
        title, sections = "Every point", [("", np.arange(count))]
    else:
        widest = np.argsort(-points.gap, kind="stable")[:rows]
        title = f"First {rows} points and the {rows} widest gaps (--all for every point)"
        sections = [("first", np.arange(rows)), ("widest", widest)]
    columns = {name: (lambda row, name=name: num(float(getattr(points, name)[row]))) for name in ("lower", "upper", "gap", "iwae")}
    console.print()
    console.print(points_table(title, points.index, sections, columns))


def render_certificate(console: Console, certificate: dict[str, Any]) -> None:
    """Print the ``ais --target-gap`` certificate: every BDMC stage with its gap and cost, and the outcome."""
    table = Table(title=f"Certificate: BDMC gap on {certificate['simulated_points']} simulated points "
                        f"(target: upper bound < {certificate['target_gap']:g} nats)", title_justify="left")
    for column in ("steps", "leapfrog", "gap", "stderr", "gap + 1.96 stderr", "gradient evaluations", "seconds"):
        table.add_column(column, justify="right")
    for stage in certificate["stages"]:
        table.add_row(str(stage["steps"]), str(stage["leapfrog"]), num(stage["gap"]["mean"]), num(stage["gap"]["stderr"]),
                      num(stage["upper"]), f"{stage['cost']:,}", f"{stage['seconds']:.1f}")
    console.print(table)
    outcome = "reached" if certificate["reached"] else "NOT reached within the budget"
    seconds = certificate["max_seconds"]
    budget = f"{seconds:g} s" if seconds is not None else f"{certificate['max_cost']:,} gradient evaluations"
    console.print(escape(
        f"Target {outcome}: AIS above ran at --steps {certificate['steps']} --leapfrog {certificate['leapfrog']}; "
        f"certification cost {certificate['cost']:,} gradient evaluations in {certificate['seconds']:.1f} s "
        f"(budget: {budget})."
    ))
