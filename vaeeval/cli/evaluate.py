"""``vaeeval elbo`` and ``vaeeval latents``: importance sampling from q(z|x)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vaeeval.analysis.gates import Threshold, check_thresholds
from vaeeval.cli.options import (
    ENUMERATION,
    PATH,
    STREAMING,
    arch_options,
    arch_settings,
    evaluation_options,
    evaluation_settings,
    option_group,
    progress_bar,
    run_with_progress,
    stdout,
    streaming_settings,
    table,
    warn,
)
from vaeeval.estimators.importance.evaluate import Evaluator
from vaeeval.estimators.importance.explain import explain as explain_recon
from vaeeval.estimators.importance.groups import group_kl
from vaeeval.format.model import Model
from vaeeval.output.documents import elbo_document, latents_document
from vaeeval.output.plot import check_plot, plot_diagnostics
from vaeeval.results.latents import LatentHealth, group_health, latent_health
from vaeeval.results.numbers import Evaluation
from vaeeval.results.recon_terms import LossStatistics, needs_statistics
from vaeeval.results.records import to_json
from vaeeval.user.sources import load


@click.command()
@click.argument("model", type=PATH)
@click.argument("data", type=PATH)
@evaluation_options
@arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.elbo/1) to stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every point in the table, not the first and worst.")
@click.option("--diagnostics", is_flag=True,
              help="Per-point standard errors, ESS and k-hat in the table, and the latent-health section.")
@click.option("--convergence", is_flag=True, help="IWAE at K = 1, 10, 100, ... from nested subsets of the samples.")
@click.option("--explain", is_flag=True,
              help="Write recon out as the loss it was trained with (SSE, BCE, ...) plus the terms that make it a log-likelihood "
                   "(a second pass over the same draws where the split needs one).")
@click.option("--plot", type=PATH, default=None, metavar="FILE.png",
              help="Draw the K-convergence curve and the per-point histogram (needs matplotlib).")
@option_group(*ENUMERATION)
@option_group(*STREAMING)
@click.option("--fail-under", "fail_under", multiple=True, metavar="METRIC=VALUE",
              help="Exit 1 when the mean of elbo, recon or iwae is below VALUE (repeatable).")
def elbo(
    model: Path,
    data: Path,
    as_json: bool,
    show_all: bool,
    diagnostics: bool,
    convergence: bool,
    explain: bool,
    plot: Path | None,
    fail_under: tuple[str, ...],
    **options: Any,
) -> None:
    """Estimate ELBO, reconstruction, KL and importance-weighted log p(x) per data point.

    MODEL is a format-1 .safetensors file (or, with --arch, a state dict); DATA a
    .npy or .npz array of shape [N, *input_shape] (or [N, D]). Numbers are nats
    per point, higher is better. On discrete data (values on a grid k/(L-1)) a
    continuous likelihood is scored as the probability of each value's bin, so
    every number is a probability. Under torchrun the points are split across the
    processes and rank 0 prints (and writes) the combined result.

    \b
    Example:
      vaeeval elbo sample_models/digits_bernoulli.safetensors sample_models/digits_binary_test.npy
      vaeeval elbo model.safetensors data.npy -k 5000 --json | jq .summary.iwae.mean
      vaeeval elbo model.safetensors data.npy --output run.jsonl --resume --fail-under iwae=-85
      torchrun --nproc-per-node 2 -m vaeeval elbo model.safetensors data.npy --json
      vaeeval elbo weights.safetensors data.npy --arch vae.py:VAE --likelihood bernoulli --decoder-output probs
      vaeeval elbo weights.safetensors data.npy --arch vae.py:CategoricalVAE --enumerate
    """
    thresholds = [Threshold.parse(text) for text in fail_under]
    streaming = streaming_settings(options)
    if streaming["streamed"] and (convergence or diagnostics or plot):
        raise click.UsageError(
            "--convergence, --diagnostics and --plot need the run's samples in one process; not with --output or --shard"
        )
    settings = evaluation_settings(options)
    loaded, dataset = load(model, data, arch=arch_settings(options), **options)
    warn(loaded)
    if plot is not None:
        check_plot(plot, [model, data])
    evaluator = Evaluator(loaded, dataset, settings)
    outcome = run_with_progress(evaluator, streaming, "evaluating points", "tables.render_elbo")
    if outcome is None:  # under torchrun, not rank 0: rank 0 reports for everyone (or an empty shard)
        return
    result, about_model, about_data = outcome.evaluation, outcome.header["model"], outcome.header["data"]
    health = _latent_health(result, loaded, evaluator) if diagnostics else None
    statistics = _explained(evaluator, result, about_model) if explain else None
    if plot is not None:
        plot_diagnostics(result, plot)
    if as_json:
        click.echo(to_json(elbo_document(result, about_model, about_data, convergence=convergence, latents=health,
                                         statistics=statistics)))
    else:
        table("tables.render_elbo")(stdout(), result, about_model, about_data, show_all=show_all, diagnostics=diagnostics,
                    convergence=convergence, latents=health, explain=explain, statistics=statistics)
    check_thresholds(result.summary, thresholds)


def _explained(evaluator: Evaluator, result: Evaluation, model: dict[str, Any]) -> LossStatistics | None:
    """--explain's second pass over the same draws, where recon_terms needs it (under torchrun: rank 0, every point)."""
    if not needs_statistics(model, result.scoring):
        return None
    with progress_bar(result.summary.n, "explaining recon (a second pass over the same draws)") as progress:
        return explain_recon(evaluator, result, model, progress)


def _latent_health(result: Evaluation, model: Model, evaluator: Evaluator) -> LatentHealth:
    health = latent_health(result.latent_means, result.latent_vars, result.points.kl, model.prior, result.settings.seed,
                           discrete=getattr(model, "discrete_family", None))
    if not getattr(model, "latent_groups", ()):  # only a hierarchical latent has groups
        return health
    with progress_bar(result.summary.n, "KL per latent group (a second pass over the same draws)") as progress:
        groups = group_kl(evaluator, progress)  # None without groups
    return health if groups is None else group_health(health, groups)


@click.command()
@click.argument("model", type=PATH)
@click.argument("data", type=PATH)
@evaluation_options
@option_group(*ENUMERATION)
@arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.latents/1) to stdout.")
def latents(model: Path, data: Path, as_json: bool, **options: Any) -> None:
    """Latent health: KL per unit, active units, I(x; z) under q, and the aggregate-posterior KL.

    A unit is active when Var_x(E_q[z_u]) > 0.01 (Burda et al. 2016). The mutual
    information uses the aggregate posterior over the whole data set; by ELBO
    surgery, mean KL = I(x; z) + KL(q(z) || p(z)). A hierarchical latent's groups
    get their own KL and active units.

    \b
    Example:
      vaeeval latents sample_models/digits_bernoulli.safetensors sample_models/digits_binary_test.npy
    """
    settings = evaluation_settings(options)
    loaded, dataset = load(model, data, arch=arch_settings(options), **options)
    warn(loaded)
    evaluator = Evaluator(loaded, dataset, settings)
    with progress_bar(dataset.n, "evaluating points") as progress:
        result = evaluator.evaluate(progress)
    health = _latent_health(result, loaded, evaluator)
    if as_json:
        click.echo(to_json(latents_document(health, loaded, dataset, result)))
    else:
        table("tables.render_latents")(stdout(), health)
