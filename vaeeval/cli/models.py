"""``vaeeval inspect``, ``compare`` and ``convert``: what a model is, which is better, format 1 from user code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from vaeeval.analysis.calibrate import calibrate as fit_calibration
from vaeeval.analysis.compare import compare as compare_models
from vaeeval.analysis.convert import convert as convert_model
from vaeeval.analysis.gates import GateFailed
from vaeeval.cli.options import (
    ANNEALING,
    CERTIFY,
    DATA,
    ENUMERATION,
    PATH,
    Seconds,
    annealing_settings,
    arch_options,
    arch_settings,
    budget,
    evaluation_options,
    evaluation_settings,
    option_group,
    per_model_arch,
    per_model_arch_options,
    progress_bar,
    stdout,
    table,
    warn,
)
from vaeeval.errors import listing
from vaeeval.estimators.annealing.certify import certify
from vaeeval.estimators.importance.evaluate import MAX_BATCH_SIZE, MAX_SAMPLES
from vaeeval.format.data import load_data, point_shape
from vaeeval.format.reading import load_model
from vaeeval.io.files import check_output
from vaeeval.output.annealing_tables import render_certificate
from vaeeval.output.documents import calibrate_document, compare_document, inspect_document
from vaeeval.output.tables import render_compare, render_inspect
from vaeeval.results.records import to_json
from vaeeval.user.arch import arch_model, source_files
from vaeeval.user.sources import load


@click.command()
@click.argument("model", type=PATH)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.inspect/1) to stdout.")
def inspect(model: Path, as_json: bool) -> None:
    """Show a model file: layers with shapes, parameters, likelihood, prior and data domain.

    \b
    Example:
      vaeeval inspect sample_models/digits_gaussian.safetensors
    """
    loaded = load_model(model)
    if as_json:
        click.echo(to_json(inspect_document(loaded)))
    else:
        render_inspect(stdout(), loaded)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=PATH, metavar="MODEL... DATA")
@evaluation_options
@click.option("--estimator", type=click.Choice(("iwae", "ais")), default="iwae", show_default=True,
              help="Rank by the importance-weighted estimate, or by annealed importance sampling (the options below).")
@option_group(*ENUMERATION)
@option_group(*ANNEALING)
@option_group(*CERTIFY)
@per_model_arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.compare/1) to stdout.")
def compare(paths: tuple[Path, ...], estimator: str, as_json: bool, target_gap: float | None, max_cost: int | Seconds,
            certify_points: int, **options: Any) -> None:
    """Evaluate several models on the same data and seed, and rank those whose numbers are comparable.

    Log-probabilities rank with log-probabilities; a log-density is never ranked
    against a probability. On discrete data continuous models are scored as the
    probability of each value's bin, so all of them can be ranked. Each model's
    difference to the best is paired over the same points, with its standard error.
    With --estimator ais the models are ranked by AIS (see vaeeval ais) instead of IWAE.

    \b
    Example:
      vaeeval compare sample_models/digits_gaussian.safetensors \\
        sample_models/digits_categorical.safetensors sample_models/digits_grey_test.npy
      vaeeval compare A.safetensors B.safetensors data.npy --estimator ais --steps 1000
      vaeeval compare vae.safetensors iwae.safetensors data.npy --arch load.py:load   # both through --arch
      vaeeval compare mine.safetensors format1.safetensors data.npy --arch vae.py:VAE --arch -
    """
    if len(paths) < 3:
        raise click.UsageError("compare needs at least two models and the data: MODEL MODEL... DATA")
    *model_paths, data = paths
    if target_gap is not None and estimator != "ais":
        raise click.UsageError("--target-gap certifies AIS settings: use it with --estimator ais")
    annealing = annealing_settings(options)
    if click.get_current_context().get_parameter_source("batch_size") is ParameterSource.DEFAULT:
        annealing = replace(annealing, batch_size=None)  # the batch for the importance samples; AIS plans its own
    settings = evaluation_settings(options)
    archs = per_model_arch(options, len(model_paths))
    loaded = [load(path, data, arch=arch, **options) for path, arch in zip(model_paths, archs, strict=True)]
    for model, _ in loaded:
        warn(model)
    models, datasets = [model for model, _ in loaded], [dataset for _, dataset in loaded]
    certificates = []
    if target_gap is not None:  # each model certified; all run at the strongest settings any of them needed
        gradients, seconds = budget(max_cost)
        certificates = [certify(model, annealing, settings, target_gap, gradients, max_seconds=seconds, points=certify_points)
                        for model in models]
        annealing = replace(annealing, steps=max(c.final.steps for c in certificates),
                            leapfrog=max(c.final.leapfrog for c in certificates))
    with progress_bar(datasets[0].n * len(models), "evaluating models") as progress:
        result = compare_models(models, datasets, settings, annealing=annealing if estimator == "ais" else None,
                                progress=progress)
    if as_json:
        document = compare_document(result, datasets[0])
        if certificates:
            document["certificates"] = [c.to_record() for c in certificates]
        click.echo(to_json(document))
    else:
        console = stdout()
        render_compare(console, result, datasets[0])
        for path, certificate in zip(model_paths, certificates, strict=False):
            console.print(f"{path}:", markup=False, highlight=False)
            render_certificate(console, certificate.to_record())
    failed = [f"{path}: {c.failure()}" for path, c in zip(model_paths, certificates, strict=False) if not c.reached]
    if failed:
        raise GateFailed("; ".join(failed))


def _convert_scvi(folder: Path, output: Path, options: dict[str, Any], *, data: Path | None, seed: int) -> None:
    """``convert --from scvi``: the SCVI folder through scvi-tools' loader, checked against scVI's own modules."""
    from vaeeval.adapters.scvi import check_folder, convert_scvi

    if options.get("arch") or data is not None:
        extra = "--arch" if options.get("arch") else "--data"
        raise click.UsageError(f"convert --from scvi reads everything from the folder; drop {extra}")
    check_output(output, [folder])
    check_folder(folder)
    click.echo(f"vaeeval: reading {folder} with scvi-tools' own loader (model.pt is a torch checkpoint: loading it runs "
               "pickled code; convert only folders you trust)", err=True)
    result = convert_scvi(folder, output, seed=seed)
    covariates = f", covariates {', '.join(result.covariates)}" if result.covariates else ""
    click.echo(
        f"wrote {result.path}: format 1, {result.family} likelihood, library size {result.library}{covariates}; "
        f"equal to scVI's q(z|x) and log p(x | z, library) on random counts to {result.largest_difference:.2g} (relative)"
    )


@click.command()
@click.argument("weights", type=PATH)
@arch_options
@click.option("-o", "--output", type=PATH, required=True, help="The format-1 file to write.")
@click.option("--data", type=PATH, default=None,
              help="Points to verify on (default: 64 drawn from the likelihood's support); also gives the input shape.")
@click.option("--key", default=None, help="The array to use from an .npz --data file (the column of a parquet or Arrow one).")
@click.option("--layer", default=None, metavar="NAME", help="The AnnData layer holding the points in an .h5ad --data file (default X).")
@click.option("-k", "--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Samples per point for the verification.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Noise seed for the verification.")
@click.option("--allow-unused", is_flag=True, help="Write the file even when state-dict tensors would be left out of it.")
@click.option("--from", "source", type=click.Choice(["scvi", "lightning"]), default=None,
              help="scvi: WEIGHTS is the folder SCVI.save wrote (RUNS scvi-tools' LOADER, which unpickles model.pt); "
                   "lightning: WEIGHTS is a Lightning .ckpt or a torch-saved state dict, read by torch's weights-only loader.")
@click.option("--state-dict", "state_dict_only", is_flag=True,
              help="With --from lightning: write the weights as a safetensors state dict for --arch, not a format-1 file.")
def convert(
    weights: Path,
    output: Path,
    data: Path | None,
    key: str | None,
    layer: str | None,
    samples: int,
    seed: int,
    allow_unused: bool,
    source: str | None,
    state_dict_only: bool,
    **options: Any,
) -> None:
    """Write a user's model (--arch, RUNS USER CODE) as a self-contained format-1 file.

    encode and decode are traced (torch.fx) into format-1 layers; two linear heads
    on one input become one layer, and the final sigmoid of a decoder giving
    probabilities is dropped (format 1 takes logits). The file is kept only if it
    gives the original's numbers on the same data and seed; otherwise the message
    names the operation format 1 cannot express, or the difference.

    With --from scvi, WEIGHTS is the folder scvi-tools' SCVI.save wrote: its own
    loader reads it (a torch checkpoint, so only convert folders you trust), and the
    file, which records the counts layer and the covariates, is kept only if it gives
    scVI's own q(z|x) and log p(x | z, library) on random counts.

    With --from lightning, WEIGHTS is a Lightning .ckpt (or a torch-saved state dict):
    only its state_dict's tensors are read, by torch's weights-only loader (nothing in
    it runs), a prefix common to the --arch class's keys (vae.) is stripped, and the
    weights are converted as above, or written as a safetensors state dict for --arch
    with --state-dict.

    \b
    Example:
      vaeeval convert weights.safetensors --arch vae.py:VAE --likelihood bernoulli \\
        --decoder-output probs --input-shape 784 -o model.safetensors
      vaeeval convert --from scvi my_scvi_model/ -o scvi.safetensors
      vaeeval convert --from lightning last.ckpt --arch vae.py:VAE --state-dict -o weights.safetensors
    """
    if source == "scvi":
        _convert_scvi(weights, output, options, data=data, seed=seed)
        return
    if state_dict_only and source != "lightning":
        raise click.UsageError("--state-dict writes the weights of a checkpoint read with --from lightning")
    arch = arch_settings(options)
    if arch is None:
        raise click.UsageError("convert needs --arch: the class that reads WEIGHTS")
    if source == "lightning":
        _convert_lightning(weights, output, arch, state_dict_only, data=data, key=key, layer=layer, samples=samples, seed=seed,
                           allow_unused=allow_unused)
        return
    if arch.covariates:
        raise click.UsageError("convert: format 1 holds no covariates; evaluate a conditional model with --arch")
    if arch.encode_shape is None and data is None:
        raise click.UsageError("convert needs --input-shape or --data: the shape of one data point")
    check_output(output, [weights, data, *source_files(arch.spec)])
    shape = arch.encode_shape or point_shape(data, key=key, layer=layer)
    source = arch_model(weights, replace(arch, encode_shape=None), shape)
    points = None if data is None else load_data(data, source, key=key, layer=layer, limit=64).array
    result = convert_model(source, output, data=points, samples=samples, seed=seed, allow_unused=allow_unused)
    _report_conversion(result)


def _convert_lightning(weights: Path, output: Path, arch: Any, state_dict_only: bool, *, data: Path | None, key: str | None,
                       layer: str | None, **settings: Any) -> None:
    """``convert --from lightning``: the checkpoint's state_dict, a prefix stripped, as a state dict or format 1."""
    from vaeeval.analysis.lightning import checkpoint_model, extract, save_state_dict

    check_output(output, [weights, data, *source_files(arch.spec)])
    if state_dict_only:
        extracted = extract(weights, arch)
        click.echo(extracted.describe())
        save_state_dict(extracted, output)
        click.echo(f"wrote {output}: the state dict of {arch.spec}; evaluate it with --arch {arch.spec}")
        return
    if arch.covariates:
        raise click.UsageError("convert: format 1 holds no covariates; write the weights with --state-dict and evaluate with --arch")
    if arch.encode_shape is None and data is None:
        raise click.UsageError("convert needs --input-shape or --data: the shape of one data point")
    shape = arch.encode_shape or point_shape(data, key=key, layer=layer)
    extracted = extract(weights, arch)
    click.echo(extracted.describe())
    model = checkpoint_model(extracted, arch, shape, output.parent)
    points = None if data is None else load_data(data, model, key=key, layer=layer, limit=64).array
    _report_conversion(convert_model(model, output, data=points, **settings))


def _report_conversion(result: Any) -> None:
    layers = result.model.layers
    encoder_layers = sum(layer.part == "encoder" for layer in layers)
    left_out = f"; left out (--allow-unused): {listing(result.unused, 6, counted=True)}" if result.unused else ""
    click.echo(
        f"wrote {result.path}: format 1, {encoder_layers} encoder and {len(layers) - encoder_layers} decoder layers, "
        f"{result.model.likelihood.family} likelihood, {result.model.prior.family} prior; verified on {result.points} "
        f"points, K = {result.samples}, seed {result.seed}: largest difference {result.largest_difference:.2g} nats{left_out}"
    )


@click.command()
@click.argument("model", type=PATH)
@click.argument("data", type=PATH)
@click.option("--output", "-o", type=PATH, required=True, metavar="NEW.safetensors", help="The calibrated model file to write.")
@click.option("--per-dimension", is_flag=True, help="Fit one scale per input dimension (a log_sigma tensor), not one shared.")
@click.option("-k", "--samples", type=click.IntRange(1, MAX_SAMPLES), default=100, show_default=True,
              help="K, draws from q(z|x) per point for the expected residuals.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Noise seed.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=64, show_default=True,
              help="Points per encoder pass. The fit does not depend on it.")
@click.option("--density", is_flag=True, help="On discrete data, fit the density's scale instead of the bins' (a closed form).")
@click.option("--criterion", type=click.Choice(["elbo", "iwae"]), default="elbo", show_default=True,
              help="What the scale maximizes on DATA (the ELBO has a closed form on densities; else a 1-D search).")
@option_group(*DATA)
@arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.calibrate/1) to stdout.")
def calibrate(model: Path, data: Path, output: Path, per_dimension: bool, samples: int, seed: int, batch_size: int,
              density: bool, criterion: str, as_json: bool, **options: Any) -> None:
    """Fit the scale of a Gaussian (sigma) or Laplace likelihood on held-out data by the ELBO; write the model with it.

    A decoder trained with a squared error has no sigma of its own, and log p(x) moves by
    tens of nats with the one you pick. The ELBO-optimal sigma has a closed form,
    sigma^2 = E_q||x - mu(z)||^2 / D over the data (one per dimension with
    --per-dimension); on discrete data (scored by its bins) and for --criterion iwae a
    1-D search finds it on the same draws. The new file differs only in that scale and
    a record of the fit; every output on it says so, and warns when it is evaluated on
    the same data. With --arch, OUTPUT is the weights file again with the fitted
    log-scale as one more tensor: pass --log-sigma-tensor calibrated_log_scale (or the
    printed --sigma with the original weights).

    \b
    Example:
      vaeeval calibrate model.safetensors heldout.npy --output calibrated.safetensors
      vaeeval elbo calibrated.safetensors test.npy
    """
    arch = arch_settings(options)
    check_output(output, [model, data, *source_files(arch.spec if arch else None)])
    loaded, dataset = load(model, data, arch=arch, **options)
    fitted = fit_calibration(loaded, dataset, output, per_dimension=per_dimension, samples=samples, seed=seed,
                             batch_size=batch_size, density=density, criterion=criterion)
    if as_json:
        click.echo(to_json(calibrate_document(fitted, loaded, dataset, str(output))))
    else:
        table("tables.render_calibration")(stdout(), fitted, loaded, dataset, str(output))
