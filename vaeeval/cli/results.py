"""``vaeeval check``, ``merge`` and ``schema``: results files and documents, without new estimates."""

from __future__ import annotations

from pathlib import Path

import click

from vaeeval.analysis.gates import CHECKED, GateFailed, check_baseline
from vaeeval.cli.options import PATH, Finite, stdout
from vaeeval.estimators.annealing.results_file import AIS_RESULTS
from vaeeval.estimators.importance.results_file import ELBO_RESULTS
from vaeeval.io.files import check_output
from vaeeval.output.annealing_tables import render_ais
from vaeeval.output.documents import ais_document, check_document, elbo_document, run_document
from vaeeval.output.tables import render_elbo, render_run
from vaeeval.results.formats import results_format
from vaeeval.results.records import to_json
from vaeeval.results.schemas import schema_names, schema_text
from vaeeval.runs.stream import merge_runs, read_results, read_stream, write_results


@click.command()
@click.argument("new", type=PATH)
@click.option("--baseline", type=PATH, required=True, help="The earlier run: an elbo --json document or results file.")
@click.option("--metric", type=click.Choice(CHECKED), default="iwae", show_default=True,
              help="The metric to compare (ais for two ais runs).")
@click.option("--tolerance", type=Finite(0.0), default=0.0, show_default=True,
              help="How many nats per point the metric may drop before the check fails.")
@click.option("--confidence", type=Finite(0.5, 1.0), default=0.95, show_default=True,
              help="One-sided confidence that the drop exceeds the tolerance before failing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.check/1) to stdout.")
def check(new: Path, baseline: Path, metric: str, tolerance: float, confidence: float, as_json: bool) -> None:
    """Fail (exit 1) when NEW is worse than --baseline by more than --tolerance, beyond Monte Carlo noise.

    Both runs must cover the same points (the same data digest): the check pairs
    them point by point, so the standard error of the difference is small, and
    fails only when even the optimistic end of the confidence interval is worse
    than the tolerance. NEW and the baseline are vaeeval elbo --json documents or
    --output results files.

    \b
    Example:
      vaeeval check new.json --baseline old.json --metric iwae --tolerance 0.5
    """
    result = check_baseline(read_results(new), read_results(baseline), metric=metric, tolerance=tolerance, confidence=confidence)
    if as_json:
        click.echo(to_json(check_document(result)))
    else:
        click.echo(result.reason)
    if not result.passed:
        raise GateFailed(result.reason)


@click.command()
@click.argument("parts", nargs=-1, required=True, type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the vaeeval.elbo/1 document a single run gives.")
@click.option("--output", type=PATH, default=None, metavar="FILE.jsonl", help="Write the results file a single run gives.")
@click.option("--all", "show_all", is_flag=True, help="List every point in the table.")
def merge(parts: tuple[Path, ...], as_json: bool, output: Path | None, show_all: bool) -> None:
    """Combine the results files of --shard runs into the results of one run.

    Every point must be in exactly one file, and every file must come from the
    same model, data, samples and seed.

    \b
    Example:
      vaeeval merge part0.jsonl part1.jsonl part2.jsonl --json > run.json
    """
    if output is not None:
        check_output(output, parts)
    merged = merge_runs([read_stream(path) for path in parts])
    model, data = merged.header["model"], merged.header["data"]
    if output is not None:
        write_results(output, merged.header, merged.records, merged.evaluation)
    if merged.header["schema"] in _MERGED:
        document, render = _MERGED[merged.header["schema"]]
        if as_json:
            click.echo(to_json(document(merged.evaluation, model, data)))
        elif output is None:
            render(stdout(), merged.evaluation, model, data, show_all=show_all)
        return
    results = results_format(merged.header)  # another registered estimator: shown from its results format
    if as_json:
        click.echo(to_json(run_document(results, merged.evaluation, merged.header, merged.records)))
    elif output is None:
        render_run(stdout(), results, merged.evaluation, merged.header, merged.records, show_all=show_all)


# what a merged results file of an estimator vaeeval ships is shown as: its --json document and its table
_MERGED = {ELBO_RESULTS.schema: (elbo_document, render_elbo), AIS_RESULTS.schema: (ais_document, render_ais)}


@click.command()
@click.argument("name", required=False)
def schema(name: str | None) -> None:
    """Print the JSON Schema of a --json output (vaeeval.elbo/1, ...); without NAME, list them.

    \b
    Example:
      vaeeval schema vaeeval.elbo/1 > elbo.schema.json
    """
    if name is None:
        click.echo("\n".join(schema_names()))
    else:
        click.echo(schema_text(name), nl=False)
