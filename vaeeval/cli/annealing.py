"""``vaeeval ais`` and ``vaeeval bdmc``: annealed importance sampling and its sandwich."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from vaeeval.analysis.gates import AIS_GATED, GateFailed, Threshold, check_thresholds
from vaeeval.cli.options import (
    CERTIFY,
    DATA,
    PATH,
    STREAMING,
    Seconds,
    annealing_options,
    annealing_settings,
    arch_options,
    arch_settings,
    budget,
    evaluation_settings,
    option_group,
    progress_bar,
    run_with_progress,
    stdout,
    streaming_settings,
    table,
    warn,
)
from vaeeval.estimators.annealing.ais import MAX_SIMULATED, AISEvaluator
from vaeeval.estimators.annealing.bdmc import BDMCEvaluator, save_simulated, simulate, simulation_grid
from vaeeval.estimators.annealing.certify import certify
from vaeeval.io.files import check_output
from vaeeval.output.documents import ais_document, bdmc_document
from vaeeval.results.records import to_json
from vaeeval.user.arch import arch_model
from vaeeval.user.sources import load, load_model


@click.command()
@click.argument("model", type=PATH)
@click.argument("data", type=PATH)
@annealing_options
@option_group(*DATA)
@arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.ais/1) to stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every point in the table.")
@option_group(*STREAMING)
@click.option("--fail-under", "fail_under", multiple=True, metavar="METRIC=VALUE",
              help="Exit 1 when the mean of ais, elbo or iwae is below VALUE (repeatable).")
@option_group(*CERTIFY)
def ais(
    model: Path,
    data: Path,
    as_json: bool,
    show_all: bool,
    fail_under: tuple[str, ...],
    target_gap: float | None,
    max_cost: int | Seconds,
    certify_points: int,
    **options: Any,
) -> None:
    """Estimate log p(x) per point by annealed importance sampling, beside the ELBO and IWAE.

    Chains start from q(z|x) (or p(z)) and are annealed to the posterior p(z|x) along
    f_t = q0^(1-β_t) (p(z) p(x|z))^β_t with HMC transitions (Neal 2001; Wu et al. 2017).
    E[elbo] <= E[iwae] <= E[ais] <= log p(x), so ais - iwae is how far the IWAE estimate
    fell short. Unless --step-size is given, a pilot run tunes the HMC step sizes per
    point and step toward 65% acceptance, and the reported run uses them frozen, which
    keeps its weights unbiased. Check the settings with vaeeval bdmc.

    \b
    Example:
      vaeeval ais sample_models/digits_gaussian.safetensors sample_models/digits_grey_test.npy --limit 20
      vaeeval ais model.safetensors data.npy --steps 2000 --chains 16 --json | jq .summary.ais.mean
    """
    thresholds = [Threshold.parse(text, AIS_GATED) for text in fail_under]
    streaming = streaming_settings(options)
    annealing, settings = annealing_settings(options), evaluation_settings(options)
    loaded, dataset = load(model, data, arch=arch_settings(options), **options)
    warn(loaded)
    certificate = None
    if target_gap is not None:
        gradients, seconds = budget(max_cost)
        certificate = certify(loaded, annealing, settings, target_gap, gradients, max_seconds=seconds, points=certify_points)
        annealing = certificate.settings(annealing)
    started = time.monotonic()
    outcome = run_with_progress(AISEvaluator(loaded, dataset, annealing, settings), streaming, "annealing", "annealing_tables.render_ais")
    if outcome is None:
        return
    result, about_model, about_data = outcome.evaluation, outcome.header["model"], outcome.header["data"]
    document = ais_document(result, about_model, about_data)
    if certificate is not None:
        document["certificate"] = certificate.to_record()
    if as_json:
        click.echo(to_json(document))
    else:
        seconds = time.monotonic() - started
        console = stdout()
        table("annealing_tables.render_ais")(console, result, about_model, about_data, show_all=show_all, seconds=seconds)
        if certificate is not None:
            table("annealing_tables.render_certificate")(console, document["certificate"])
    if certificate is not None and not certificate.reached:
        raise GateFailed(certificate.failure())
    check_thresholds(result.summary, thresholds)


@click.command()
@click.argument("model", type=PATH)
@click.option("--n", "n", type=click.IntRange(1, MAX_SIMULATED), default=100, show_default=True,
              help="Points to simulate from the model.")
@annealing_options
@arch_options
@click.option("--save-data", type=PATH, default=None, metavar="FILE.npz", help="Write the simulated x and z.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.bdmc/1) to stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every point in the table.")
def bdmc(model: Path, n: int, save_data: Path | None, as_json: bool, show_all: bool, **options: Any) -> None:
    """Certify AIS: sandwich log p(x) of points simulated from the model between two AIS runs.

    Draws z ~ p(z) and x ~ p(x|z) (on the model's data domain), then runs forward AIS
    from q0 (a stochastic lower bound on log p(x)) and reverse AIS from the z that made
    each x (an exact posterior sample: a stochastic upper bound), with the same options
    as vaeeval ais (Grosse et al. 2015; Wu et al. 2017). The gap upper - lower bounds how
    far AIS at these settings is from the truth on such data; above 1 nat per point the
    settings are too weak for the model.

    \b
    Example:
      vaeeval bdmc sample_models/digits_bernoulli.safetensors --n 20 --steps 200
    """
    annealing, settings = annealing_settings(options), evaluation_settings(options)
    arch = arch_settings(options)
    if arch is None:
        loaded = load_model(model)
    elif arch.encode_shape is None:
        raise click.UsageError("bdmc --arch needs --input-shape: the shape of one data point")
    elif arch.lengths is not None:
        raise click.UsageError("bdmc simulates its points, and has no data to read --lengths from; run vaeeval ais on data")
    else:
        loaded = arch_model(model, replace(arch, encode_shape=None), arch.encode_shape)
    bins = simulation_grid(loaded, settings.discretize, settings.density, settings.grid_range)
    simulated = simulate(loaded, n, seed=settings.seed, bins=bins)
    if save_data is not None:
        check_output(save_data, [model], parameter="save_data")
        save_simulated(save_data, simulated)
    evaluator = BDMCEvaluator(loaded, simulated, annealing, settings)
    started = time.monotonic()
    with progress_bar(n, "annealing both ways") as progress:
        result = evaluator.evaluate(progress)
    document = bdmc_document(result, loaded, simulated, str(save_data) if save_data else None)
    if as_json:
        click.echo(to_json(document))
    else:
        table("annealing_tables.render_bdmc")(stdout(), result, document["model"], document["data"], show_all=show_all,
                    seconds=time.monotonic() - started)
