"""Results -> rich tables for people (stdout)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from vaeeval.errors import listing
from vaeeval.estimators.annealing.certify import elbo_note
from vaeeval.format.domains import Grid
from vaeeval.format.layers import format_shape
from vaeeval.format.terms import DENSITY
from vaeeval.output.documents import CALIBRATION_NOTE
from vaeeval.output.groups_table import groups_table
from vaeeval.results.formats import ResultsFormat
from vaeeval.results.numbers import METRICS, AISCost, AISSettings, Evaluation
from vaeeval.results.recon_terms import LossStatistics, recon_terms
from vaeeval.results.records import DEQUANTIZATION
from vaeeval.results.sequences import sequence_rows

if TYPE_CHECKING:
    from vaeeval.analysis.compare import Comparison
    from vaeeval.format.data import Dataset
    from vaeeval.format.model import Model
    from vaeeval.results.latents import LatentHealth

_MEANINGS = {
    "elbo": "ELBO = recon - KL, a lower bound on log p(x)",
    "recon": "E_q[log p(x|z)], the reconstruction term",
    "kl": "KL(q(z|x) || p(z))",
    "iwae": "importance-weighted estimate of log p(x)",
}


def num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _measure_note(evaluation: Evaluation) -> str:
    note = f"recon and iwae are {evaluation.scoring.note}"
    if evaluation.measure == DENSITY:
        note += "; a density is not a probability: comparable only with densities of the same continuous data"
    return note


def _family(spec: dict[str, Any]) -> str:
    """A likelihood's or prior's family; for one a model returns as a distribution, its class too."""
    family = spec["family"]
    return f"{family}: {spec['distribution']}" if "distribution" in spec and family != "standard_normal" else family


def _header(evaluation: Evaluation, model: dict[str, Any], data: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("model", escape(f"{model['path']}"))
    if model["description"]:
        grid.add_row("", f"[dim]{escape(model['description'])}[/]")
    for note in model.get("notes", ()):
        grid.add_row("note", f"[{'red' if note.startswith('warning') else 'yellow'}]{escape(note)}[/]")
    grid.add_row("likelihood", f"{_family(model['likelihood'])}, reported as {evaluation.scoring.label}")
    grid.add_row("prior", f"{_family(model['prior'])}, KL {evaluation.kl_kind.replace('_', ' ')}")
    grid.add_row("latent dim", str(model["latent_dim"]))
    n, total = data["n"], data["total"]
    shown = f"{n} of {total}" if n != total else str(n)
    key = f" [{data['key']}]" if data["key"] else ""
    given = f"; given {', '.join(data['covariates'])}" if data.get("covariates") else ""
    grid.add_row("data", escape(f"{data['path']}{key}: N = {shown} points, D = {model['dims']} dims{given}"))
    grid.add_row("values", f"{evaluation.domain.describe()} (detected)")
    settings = evaluation.settings
    grid.add_row("samples", f"K = {settings.samples}, seed {settings.seed}, on {settings.device}")
    return grid


def _summary_table(evaluation: Evaluation, dims: int) -> Table:
    table = Table(title="Summary over points (nats per point)", title_justify="left", caption=_measure_note(evaluation))
    table.add_column("metric", style="bold")
    table.add_column("mean", justify="right")
    table.add_column("stderr", justify="right")
    table.add_column("meaning")
    summary = evaluation.summary
    for name in METRICS:
        stat = getattr(summary, name)
        table.add_row(name, num(stat.mean), num(stat.stderr), escape(_MEANINGS[name]))
    if summary.sequences is not None:  # padded sequences: per token, not per padded slot
        for label, stat, meaning in sequence_rows(summary.sequences):
            table.add_row(label, num(stat.mean), num(stat.stderr), escape(meaning))
    else:
        table.add_row(
            "bits/dim",
            num(summary.bits_per_dim.mean),
            num(summary.bits_per_dim.stderr),
            f"-iwae / (D ln 2), D = {dims}" + (" (of a density)" if evaluation.measure == DENSITY else ""),
        )
    if summary.dequantized_bits_per_dim is not None:
        table.add_row(
            "dequant. bits/dim",
            num(summary.dequantized_bits_per_dim.mean),
            num(summary.dequantized_bits_per_dim.stderr),
            escape(f"-(iwae + D log Δ) / (D ln 2), Δ = {_step(evaluation.scoring.data_grid)}: {DEQUANTIZATION}"),
        )
    return table


def _point_rows(evaluation: Evaluation, show_all: bool, rows: int) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """The title and the (label, rows) sections a per-point table shows."""
    points = evaluation.points
    n = points.index.size
    if show_all or n <= 2 * rows:
        return "Every point", [("", np.arange(n))]
    worst = np.argsort(points.iwae, kind="stable")[:rows]
    return f"First {rows} and worst {rows} points by iwae (--all for every point)", [("first", np.arange(rows)), ("worst", worst)]


def points_table(
    title: str, index: np.ndarray, sections: list[tuple[str, np.ndarray]], columns: dict[str, Any]
) -> Table:
    """One row per shown point; ``columns`` maps a header to a function of the row number."""
    table = Table(title=title, title_justify="left")
    table.add_column("", style="dim")
    table.add_column("index", justify="right")
    for header in columns:
        table.add_column(escape(header), justify="right")
    for label, rows_shown in sections:
        for position, row in enumerate(rows_shown):
            table.add_row(label if position == 0 else "", str(int(index[row])), *(cell(row) for cell in columns.values()))
        table.add_section()
    return table


def _estimate_columns(evaluation: Evaluation) -> dict[str, Any]:
    points = evaluation.points
    return {name: (lambda row, name=name: num(float(getattr(points, name)[row]))) for name in METRICS}


def _trust_columns(evaluation: Evaluation) -> dict[str, Any]:
    points, samples = evaluation.points, evaluation.settings.samples
    return {
        "± elbo": lambda row: num(float(points.elbo_stderr[row]), 3),
        "± iwae": lambda row: num(float(points.iwae_stderr[row]), 3),
        "ESS/K": lambda row: num(float(points.ess[row] / samples), 3),
        "k-hat": lambda row: num(float(points.khat[row]), 2) if np.isfinite(points.khat[row]) else str(points.khat[row]),
        "": lambda row: "[red]unreliable[/]" if points.unreliable[row] else "",
    }


def _trust_lines(evaluation: Evaluation) -> list[str]:
    diagnostics = evaluation.summary.diagnostics
    flagged = diagnostics.unreliable
    if np.isnan(evaluation.points.khat).all():  # an exact enumeration: no importance weights
        return [
            f"log p(x) − ELBO: {num(diagnostics.gap.mean, 3)} ± {num(diagnostics.gap.stderr, 3)} nats (the inference "
            "gap, exact). k-hat does not apply: log p(x) is a sum over every value of z, with no importance weights."
        ]
    lines = [
        f"IWAE − ELBO: {num(diagnostics.gap.mean, 3)} ± {num(diagnostics.gap.stderr, 3)} nats "
        "(a lower bound on the inference gap); mean ESS/K "
        f"{num(diagnostics.ess_fraction.mean, 3)}; mean per-point stderr: elbo "
        f"{num(diagnostics.elbo_stderr.mean, 3)}, iwae {num(diagnostics.iwae_stderr.mean, 3)}."
    ]
    if flagged:
        shown = listing(flagged, 10)
        lines.append(
            f"[red]{len(flagged)} of {evaluation.summary.n} points ({100 * diagnostics.share:.1f}%) are unreliable[/]: "
            f"k-hat > {diagnostics.threshold:.2f}, so importance sampling may be badly low there "
            f"(worst first: {shown})."
        )
    else:
        lines.append(f"No point is unreliable (every k-hat ≤ {num(diagnostics.threshold, 2)}).")
    return lines


def _convergence_table(evaluation: Evaluation) -> Table:
    table = Table(title="IWAE as K grows (the first k of the same samples)", title_justify="left")
    for column in ("k", "iwae", "stderr", "change"):
        table.add_column(column, justify="right")
    previous = None
    for k, stat in evaluation.convergence.summary():
        change = "" if previous is None else num(stat.mean - previous, 4)
        table.add_row(str(k), num(stat.mean), num(stat.stderr), change)
        previous = stat.mean
    return table


def _latents_table(health: LatentHealth) -> Table:
    table = Table(title="Latent units", title_justify="left")
    for column in ("unit", "KL (mean)", "Var_x E_q[z]", "active"):
        table.add_column(escape(column), justify="right")
    for unit, activity in enumerate(health.activity):
        kl = "—" if health.kl_per_dim is None else num(float(health.kl_per_dim[unit]), 4)
        table.add_row(str(unit), kl, num(float(activity), 4), "yes" if health.active[unit] else "[red]no[/]")
    table.caption = escape(
        f"active units {int(health.active.sum())} of {health.active.size}; I(x; z) under q "
        f"{health.mutual_information:.3f} nats (at most log N = {health.max_information:.2f}); "
        f"mean KL {health.mean_kl:.3f} = I + KL(q(z) || p(z)), so KL(q(z) || p(z)) = {health.aggregate_kl:.3f}"
    )
    return table


def render_latents(console: Console, health: LatentHealth) -> None:
    """Print the latent-health table (and a hierarchical latent's groups) and, when units collapsed, the warning."""
    console.print(_latents_table(health))
    if health.groups is not None:
        console.print(groups_table(health))
    if health.warning:
        console.print(f"[red]{escape(health.warning)}[/]")


def render_elbo(
    console: Console,
    evaluation: Evaluation,
    model: dict[str, Any],
    data: dict[str, Any],
    *,
    show_all: bool = False,
    diagnostics: bool = False,
    convergence: bool = False,
    latents: LatentHealth | None = None,
    explain: bool = False,
    statistics: LossStatistics | None = None,
    rows: int = 5,
) -> None:
    """Print the ``vaeeval elbo`` report: header, summary, trust, per-point table, optional sections.

    ``model`` and ``data`` are ``model_record`` and ``data_record`` of what was evaluated; ``statistics``
    ``--explain``'s second pass, where the reconstruction term's split needs it.
    """
    console.print(_header(evaluation, model, data))
    console.print()
    console.print(_summary_table(evaluation, model["dims"]))
    for line in _trust_lines(evaluation):
        console.print(line)
    console.print()
    title, sections = _point_rows(evaluation, show_all, rows)
    index = evaluation.points.index
    console.print(points_table(title, index, sections, _estimate_columns(evaluation)))
    if show_all or diagnostics:
        console.print(points_table("Trust per point (Monte Carlo standard errors, effective sample size, PSIS k-hat)",
                                    index, sections, _trust_columns(evaluation)))
    if convergence:
        console.print()
        console.print(_convergence_table(evaluation))
    if latents is not None:
        console.print()
        render_latents(console, latents)
    if explain:
        console.print()
        render_recon_terms(console, recon_terms(evaluation.points.recon, model, evaluation.scoring, statistics))
    note = elbo_note(evaluation, model, data, convergence=convergence)
    if note is not None:
        console.print(f"note: {note}", markup=False, highlight=False)


def render_recon_terms(console: Console, terms: dict[str, Any]) -> None:
    """The reconstruction term as the loss it was trained with plus what makes it a log-likelihood (``--explain``)."""
    if terms.get("terms") is None:
        console.print(escape(f"recon ({terms['family']}): not split: {terms['why']}"))
        return
    table = Table(title=escape(f"recon, written out: {terms['form']}"), title_justify="left")
    for column in ("term", "mean", "± s.e."):
        table.add_column(column, justify="left" if column == "term" else "right")
    for term in terms["terms"]:
        table.add_row(escape(term["name"]), num(term["mean"]), num(term["stderr"]))
    for key, what in (("loss", "the loss"), ("weighted_loss", "the loss over the scale")):
        if terms.get(key):
            table.add_row(escape(f"{terms[key]['name']} ({what})"), num(terms[key]["mean"]), num(terms[key]["stderr"]))
    for key, name in (("mse_per_dim", "MSE per dimension"), ("mae_per_dim", "mean |x - mu| per dimension")):
        if terms.get(key):
            table.add_row(name, num(terms[key]["mean"]), num(terms[key]["stderr"]))
    console.print(table)
    if terms.get("bin_width") is not None:
        console.print(escape(f"bins: {terms['levels']} levels, width w = {num(terms['bin_width'])}"))
    implied = terms.get("implied_sigma")
    if implied:
        fitted = implied["fitted_by_calibrate"]
        console.print(escape(
            f"sigma: in the file {num(implied['in_file'])}; the ELBO's best on this data {num(fitted)} (vaeeval calibrate); "
            f"implied by training with w*SSE + KL, sigma^2 = 1/(2w): sum-reduced MSE (w = 1) {implied['sum_reduced_mse']:.4f}, "
            f"mean-reduced MSE (w = 1/D) {implied['mean_reduced_mse']:.4f}"
        ))
    if terms.get("note"):
        console.print(escape(f"note: {terms['note']}"))


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
            top = model.hierarchy is not None and part.startswith("hierarchy prior")
            table.add_row("z2" if top else "latent", "", "", "", f"[{model.hierarchy.latent_dim if top else model.latent_dim}]", "")
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
    if model.hierarchy is None:
        facts.add_row("prior", f"{model.prior.family}, KL {model.prior.kl_kind}")
    else:
        facts.add_row("prior", f"p(z2) {model.prior.family} over {model.hierarchy.latent_dim} units, p(z1|z2) from the hierarchy "
                      "prior's layers; KL monte_carlo (the chain)")
    if model.posterior_family != "gaussian":
        facts.add_row("q(z|x)", f"{model.posterior_family} from the encoder's logits (format 1's discrete latent)")
    facts.add_row("data domain", model.domain.describe() if model.domain else "not declared")
    if model.data_layer:
        facts.add_row("counts layer", escape(f"{model.data_layer} (of an .h5ad DATA file)"))
    if model.covariates:
        shown = [f"{name} ({len(model.categories[name])} categories)" if name in model.categories else name for name in model.covariates]
        facts.add_row("covariates", escape(", ".join(shown) + ": the numbers are log p(x | covariates)"))
    if model.library is not None:
        facts.add_row("library size", model.library.describe())
    if model.variance_floor:
        facts.add_row("q(z|x)", f"variance exp(log-variance) + {model.variance_floor:g}")
    if model.calibration is not None:
        record = model.calibration
        fitted = record.get("fitted")
        what = f"tensor {fitted}" if isinstance(fitted, str) else f"{fitted:.6g}"
        facts.add_row("calibration", escape(
            f"scale {what} fitted by vaeeval calibrate on {record['data'].get('path') or 'data'} ({record['data']['n']} points, "
            f"{record['data']['digest'][:19]}; K = {record.get('samples')}, seed {record.get('seed')}, by the "
            f"{record.get('criterion', 'elbo')}); there before: ELBO {num(record.get('before', {}).get('elbo'))}"))
    facts.add_row("parameters", f"{model.parameter_count:,}")
    console.print(Group(table, Text(), facts))


def _label(model: Model) -> str:
    return model.path.stem if model.path else "model"


def ais_settings_line(settings: AISSettings, cost: AISCost, from_prior: np.ndarray | None = None) -> str:
    """The annealing settings in a line; ``from_prior`` (per point) counts --init auto's starts from p(z)."""
    step = f"ε tuned per point and step by a pilot of {settings.pilot_chains} chains" if settings.step_size is None else (
        f"ε {settings.step_size:g}"
    )
    start = {"encoder": "q(z|x)", "prior": "p(z)"}.get(settings.init, "q(z|x), or p(z) where its pilot led by a quarter nat")
    if settings.init == "auto" and from_prior is not None:
        start += f" ({np.count_nonzero(from_prior)} of {from_prior.size} points)"
    return (
        f"T = {settings.steps} steps ({settings.schedule}), {settings.leapfrog} leapfrog steps, "
        f"C = {settings.chains} chains from {start}, {settings.mass} mass matrix; {step}; seed {settings.seed}, on {settings.device}"
    )


def render_compare(console: Console, comparison: Comparison, dataset: Dataset) -> None:
    """Print the ``vaeeval compare`` table: a row per model, ranks, paired differences, notes."""
    first = comparison.evaluations[0]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("data", escape(f"{dataset.path}: N = {dataset.n} points, D = {dataset.dims} dims"))
    grid.add_row("values", f"{dataset.domain.describe()} (detected)")
    grid.add_row("samples", f"K = {first.settings.samples}, seed {first.settings.seed}, the same for every model")
    metric = comparison.metric
    if metric == "ais":
        grid.add_row("annealing", ais_settings_line(first.settings, first.cost))
    console.print(grid)
    console.print()

    by_model = {d.model: d for d in comparison.differences}
    models = Table(title="Models", title_justify="left")
    estimates = Table(title="Estimates (nats per point; ± is the standard error over points)", title_justify="left")
    trust = "acceptance" if metric == "ais" else "unreliable"
    for column in ("#", "model", "family", "measure", "bits/dim", trust):
        models.add_column(column, justify="right" if column in ("#", "bits/dim", trust) else "left")
    shown = ("elbo", "iwae", "ais") if metric == "ais" else METRICS
    for column in ("#", *shown, "±", f"Δ {metric}", "± paired"):
        estimates.add_column(column, justify="right", no_wrap=True)
    for group in comparison.groups:
        for index in group.members:
            model, evaluation = comparison.models[index], comparison.evaluations[index]
            summary = evaluation.summary
            rank = comparison.rank(index)
            models.add_row(
                str(rank or "—"),
                escape(_label(model)),
                model.likelihood.family,
                evaluation.scoring.label,
                num(summary.bits_per_dim.mean, 4),
                num(summary.acceptance.mean, 2) if metric == "ais" else f"{100 * summary.diagnostics.share:.0f}%",
            )
            difference = by_model.get(index)
            if difference is None:
                delta = ("best", "") if group.ranked else ("not ranked", "")
            else:
                delta = (num(-difference.paired.mean, 2), num(difference.paired.stderr, 2))
            estimates.add_row(
                str(rank or "—"),
                *(num(getattr(summary, name).mean, 2) for name in shown),
                num(getattr(summary, metric).stderr, 2),
                *delta,
            )
        models.add_section()
        estimates.add_section()
    console.print(models)
    console.print(estimates)
    if comparison.differences:
        unpaired = ", ".join(
            f"{_label(comparison.models[d.model])} {num(d.unpaired_stderr, 2)}" for d in comparison.differences
        )
        console.print(
            f"[dim]Δ {metric}: the model minus the best of its measure, point by point over the same points; "
            f"± paired is that difference's standard error (treating the two means as independent: {unpaired}).[/]"
        )
    for note in comparison.notes:
        console.print(escape(note))
    shaky = [] if metric == "ais" else [
        _label(m) for m, e in zip(comparison.models, comparison.evaluations, strict=True) if e.summary.diagnostics.share > 0.1
    ]
    if shaky:
        console.print(
            f"[red]k-hat flags over 10% of the points of {', '.join(shaky)}[/]: those IWAE estimates may still be "
            "low (see vaeeval elbo --diagnostics --convergence); a larger K or a better encoder makes them trustworthy."
        )


def render_run(console: Console, results: ResultsFormat, evaluation: Any, header: dict[str, Any],
               records: list[dict[str, Any]], *, show_all: bool = False, rows: int = 10) -> None:
    """A run of any registered estimator, from its results format alone: what it evaluated, the summary's
    means with their standard errors, and its points (the first ``rows``, or all) in its declared columns."""
    model, data = header["model"], header["data"]
    grid = Table.grid(padding=(0, 2))
    grid.add_row("model", escape(str(model.get("path"))))
    grid.add_row("data", escape(f"{data.get('path')}: N = {len(records)} points"))
    grid.add_row("results", escape(results.schema))
    console.print(grid)
    console.print()
    summary = Table(title="summary (nats per point)", title_justify="left")
    for column in ("", "mean", "± s.e."):
        summary.add_column(column, justify="right" if column else "left")
    for key, value in results.summary(evaluation).items():
        if isinstance(value, dict) and set(value) >= {"mean", "stderr"}:
            summary.add_row(key, num(value["mean"]), num(value["stderr"]))
    console.print(summary)
    shown = sorted(records, key=lambda record: record["index"])
    shown = shown if show_all else shown[:rows]
    points = Table(title=f"points ({len(shown)} of {len(records)})", title_justify="left")
    names = [name for name in results.columns.names() if any(name in record for record in shown)]
    for name in ("index", *names):
        points.add_column(name, justify="right")
    for record in shown:
        points.add_row(str(record["index"]), *(_cell(record.get(name)) for name in names))
    console.print(points)


def _cell(value: Any) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else num(value)


def render_calibration(console: Console, calibration: Any, model: Model, data: Dataset, output: str) -> None:
    """Print what ``vaeeval calibrate`` fitted and what it changed on the calibration data."""
    symbol = "σ" if calibration.family == "gaussian" else "b"
    grid = Table.grid(padding=(0, 2))
    grid.add_row("model", escape(f"{model.path}: {calibration.family} likelihood"))
    grid.add_row("data", escape(f"{data.path}: N = {data.n} points, D = {model.data_dims} dims, "
                                f"K = {calibration.record['samples']} draws per point, seed {calibration.record['seed']}"))
    if calibration.per_dimension:
        scale = np.asarray(calibration.scale)
        fitted = (f"{symbol}_d per dimension: min {scale.min():.4g}, median {float(np.median(scale)):.4g}, "
                  f"max {scale.max():.4g} (log_{'sigma' if symbol == 'σ' else 'scale'} tensor)")
    else:
        fitted = f"{symbol} = {calibration.scale:.6g} (pass --sigma {calibration.scale!r} to an --arch model)"
    grid.add_row("fitted", escape(fitted))
    grid.add_row("written", escape(output))
    if calibration.arch_options:
        grid.add_row("use", escape(f"--arch {model.arch} ... with the weights {output} and {' '.join(calibration.arch_options)}"))
    console.print(grid)
    console.print()
    numbers = Table(title="on the calibration data (nats per point)", title_justify="left")
    for column in ("", "before", "after"):
        numbers.add_column(column, justify="right" if column else "left")
    for name in ("elbo", "iwae"):
        numbers.add_row(name, num(calibration.before[name]), num(calibration.after[name]))
    console.print(numbers)
    console.print(escape(f"note: {CALIBRATION_NOTE}"))


def _step(grid: Grid) -> str:
    """The bin width: ``1/16`` on [0, 1], the number itself on another range."""
    return f"1/{grid.levels - 1}" if grid.unit else f"{grid.step:.6g}"
