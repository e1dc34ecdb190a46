"""The ``vaeeval`` command line: parse, make one library call, render, map errors to exit codes.

Exit codes: 0 success; 1 the run worked but a requested check failed; 2 bad
input (a file, an option, the data), reported as one line on stderr; 130
interrupted. The library names its parameters (``samples``); here they become
the flags a user typed (``--samples``).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console

from vaeeval import __version__, tuning
from vaeeval.analysis.compare import compare as compare_models
from vaeeval.analysis.convert import convert as convert_model
from vaeeval.analysis.gates import AIS_GATED, CHECKED, GateFailed, Threshold, check_baseline, check_thresholds
from vaeeval.errors import VaeevalError, listing
from vaeeval.estimators.annealing.ais import (
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG,
    DEFAULT_PILOT_CHAINS,
    DEFAULT_STEPS,
    INITS,
    MAX_CHAINS,
    MAX_LEAPFROG,
    MAX_SIMULATED,
    MAX_STEPS,
    AISEvaluator,
    AISOptions,
    BDMCEvaluator,
    save_simulated,
    simulate,
    simulation_levels,
)
from vaeeval.estimators.annealing.kernel import SCHEDULES, STEP_SIZE_RANGE
from vaeeval.estimators.importance.evaluate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_SAMPLES,
    MAX_BATCH_SIZE,
    MAX_SAMPLES,
    EvaluationOptions,
    Evaluator,
)
from vaeeval.format.data import load_data, point_shape
from vaeeval.format.likelihoods import families, likelihood_spec
from vaeeval.format.model import Model, load_model
from vaeeval.format.specs import MAX_LEVELS
from vaeeval.io.files import check_output, load_json
from vaeeval.output.documents import (
    ais_document,
    bdmc_document,
    check_document,
    compare_document,
    elbo_document,
    inspect_document,
    latents_document,
)
from vaeeval.output.plot import check_plot, plot_diagnostics
from vaeeval.output.tables import (
    ProgressBar,
    render_ais,
    render_bdmc,
    render_compare,
    render_elbo,
    render_inspect,
    render_latents,
)
from vaeeval.results.latents import LatentHealth, latent_health
from vaeeval.results.numbers import Evaluation
from vaeeval.results.records import to_json
from vaeeval.results.schemas import schema_names, schema_text
from vaeeval.runs.run import Outcome, distributed_world, local_processes, run
from vaeeval.runs.stream import AIS_RESULTS, ELBO_RESULTS, Shard, merge_runs, read_results, read_stream, write_results
from vaeeval.user.arch import DECODER_OUTPUTS, ArchOptions, arch_model
from vaeeval.user.sources import load

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class _Group(click.Group):
    """A click group whose every failure is one line on stderr with exit code 2."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy's and torch's warnings never reach the user's stderr
                code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.UsageError as error:
            hint = f" (see '{error.ctx.command_path} --help')" if error.ctx else ""
            _fail(f"{error.format_message()}{hint}")
        except VaeevalError as error:
            _fail(error.render(self.flag))
        except GateFailed as error:
            click.echo(f"vaeeval: check failed: {error}", err=True)
            sys.exit(EXIT_CHECK_FAILED)
        except click.Abort:
            click.echo("vaeeval: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as error:
            _fail(error.format_message())
        sys.exit(code if isinstance(code, int) else 0)

    def flag(self, parameter: str) -> str:
        """The flag a user types for the library's ``parameter``: its longest option string."""
        for command in self.commands.values():
            for param in command.params:
                if param.name == parameter and param.opts:
                    return max(param.opts, key=len)
        return "--" + parameter.replace("_", "-")


def _fail(message: str) -> None:
    click.echo(f"vaeeval: error: {' '.join(message.splitlines())}", err=True)
    sys.exit(EXIT_BAD_INPUT)


class _ByteSize(click.ParamType):
    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        match = _SIZE.match(str(value))
        if not match or float(match.group(1)) <= 0:
            self.fail(f"{value!r} is not a size like 512M, 2G or 1000000", param, ctx)
        factor = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
        size = int(float(match.group(1)) * factor)
        if not 1 <= size <= _LARGEST_SIZE:
            self.fail(f"{value!r} is not a size from 1 byte to 1P", param, ctx)
        return size


_LARGEST_SIZE = 2**50


class _Finite(click.ParamType):
    """A finite float: NaN and infinities are refused."""

    name = "float"

    def __init__(self, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if number < self.low or number > self.high or (self.low_open and number == self.low):
            side = ">" if self.low_open else ">="
            self.fail(f"{value!r} is not {side} {self.low:g}" + (f" and <= {self.high:g}" if self.high < math.inf else ""), param, ctx)
        return number


_PATH = click.Path(path_type=Path, dir_okay=True, exists=False)


def _stdout() -> Console:
    """Where tables go: the terminal's width, or 120 columns into a file or pipe (not rich's 80)."""
    console = Console()
    return console if console.is_terminal else Console(width=120)


def _warn(model: Model) -> None:
    """The model's warnings (a likely misread decoder), one line each on stderr, besides the output's notes."""
    for note in model.notes:
        if note.startswith("warning: "):
            click.echo(f"vaeeval: {note}", err=True)


def _progress(total: int, label: str) -> ProgressBar:
    return ProgressBar(total, label, Console(stderr=True))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vaeeval")
def main() -> None:
    """How good is a trained VAE, really? ELBO, reconstruction, KL and log p(x) in real nats.

    Models are format-1 .safetensors files (FORMAT.md); nothing in a model or
    data file is ever executed or unpickled.
    """
    tuning.keep_freed_memory()
    if distributed_world() is not None:
        tuning.share_cores(local_processes())


def _options(*decorators: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Apply a group of click options, the first listed first in --help."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


_SAMPLES = click.option("-k", "--samples", type=click.IntRange(1, MAX_SAMPLES), default=DEFAULT_SAMPLES, show_default=True,
                        help="K, importance samples from q(z|x) per point.")
_SEED = click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True,
                     help="Noise seed; each point's samples depend only on (seed, point index).")
_BATCH_SIZE = click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=DEFAULT_BATCH_SIZE, show_default=True,
                           help="Points per encoder pass. Results do not depend on it.")
_MAX_MEMORY = click.option("--max-memory", type=_ByteSize(), default=DEFAULT_MAX_MEMORY, show_default="512M",
                           help="Working-memory budget for a chunk of samples, e.g. 256M, 2G.")
_DATA = (
    click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N points."),
    click.option("--key", default=None, help="The array to use from an .npz file that holds several."),
    click.option("--layer", default=None, metavar="NAME",
                 help="The AnnData layer holding the data in an .h5ad DATA file; default: the one the model file records, else X."),
    click.option("--max-data-size", type=_ByteSize(), default=None, show_default="half the memory",
                 help="Refuse an .npz array that would inflate to more than this, e.g. 4G."),
)


_DEVICE = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
_SCORING = (
    click.option("--discretize", type=click.IntRange(2, MAX_LEVELS), default=None, metavar="L",
                 help="Score continuous likelihoods as the probability of each value's bin on L levels."),
    click.option("--density", is_flag=True,
                 help="Keep continuous likelihoods' densities even when the data is discrete."),
)
_evaluation_options = _options(_SAMPLES, _SEED, _BATCH_SIZE, _MAX_MEMORY, *_DATA, _DEVICE, *_SCORING)


def _evaluation(options: dict[str, Any]) -> EvaluationOptions:
    """The evaluation settings, taken out of the command's options."""
    return EvaluationOptions(
        samples=options.pop("samples"),
        seed=options.pop("seed"),
        batch_size=options.pop("batch_size") or DEFAULT_BATCH_SIZE,
        max_memory=options.pop("max_memory"),
        device=options.pop("device"),
        discretize=options.pop("discretize"),
        density=options.pop("density"),
    )


_ANNEALING = (
    click.option("--steps", type=click.IntRange(min=1, max=MAX_STEPS), default=DEFAULT_STEPS, show_default=True,
                 help="T, annealing steps from the initial distribution to the posterior."),
    click.option("--schedule", type=click.Choice(SCHEDULES), default="sigmoid", show_default=True,
                 help="How the steps are spaced in β (sigmoid: dense at both ends, as Wu et al. 2017)."),
    click.option("--leapfrog", type=click.IntRange(1, MAX_LEAPFROG), default=DEFAULT_LEAPFROG, show_default=True,
                 help="Leapfrog steps per HMC transition."),
    click.option("--chains", type=click.IntRange(1, MAX_CHAINS), default=DEFAULT_CHAINS, show_default=True,
                 help="C, independent chains per point."),
    click.option("--init", type=click.Choice(INITS), default="encoder", show_default=True,
                 help="Start from q(z|x) (encoder) or from p(z) (prior)."),
    click.option("--step-size", type=_Finite(*STEP_SIZE_RANGE), default=None, metavar="E",
                 help="A fixed HMC step size; by default a pilot run tunes one per point and step."),
    click.option("--pilot-chains", type=click.IntRange(1, MAX_CHAINS), default=DEFAULT_PILOT_CHAINS, show_default=True,
                 help="Chains per point in the pilot run that tunes the step sizes."),
)
_annealing_options = _options(
    *_ANNEALING,
    _SAMPLES,
    _SEED,
    click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=None,
                 help="Points annealed together (default: about 2048 chains in the memory budget). Results do not depend on it."),
    _MAX_MEMORY, _DEVICE, *_SCORING,
)


def _annealing(options: dict[str, Any]) -> AISOptions:
    """The annealing settings, taken out of the command's options (the evaluation settings stay)."""
    return AISOptions(
        steps=options.pop("steps"),
        leapfrog=options.pop("leapfrog"),
        chains=options.pop("chains"),
        init=options.pop("init"),
        schedule=options.pop("schedule"),
        step_size=options.pop("step_size"),
        pilot_chains=options.pop("pilot_chains"),
        batch_size=options["batch_size"],
    )


_ARCH_ONLY = ("arch_args", "likelihood", "sigma", "log_sigma_tensor", "levels", "input_shape", "covariates")
_LIKELIHOOD_ONLY = ("sigma", "log_sigma_tensor", "levels")
_ARCH = (
    (("--arch",), {"metavar": "FILE.py:NAME", "default": None,
                   "help": "RUNS USER CODE: evaluate MODEL (then a safetensors state dict) with the class or factory "
                           "NAME from FILE.py, package.module:NAME, or a name registered under the entry-point group "
                           "vaeeval.architectures. Without --arch nothing from any file is executed."}),
    (("--arch-args",), {"metavar": "JSON", "default": None,
                        "help": "Keyword arguments for the class or factory, as a JSON object: '{\"latent_dim\": 20}'."}),
    (("--likelihood",), {"type": click.Choice(families()), "default": None,
                         "help": "With --arch: the distribution decode's output parameterizes (not needed when decode "
                                 "returns a torch distribution)."}),
    (("--sigma",), {"type": _Finite(0.0, low_open=True), "default": None,
                    "help": "With --arch: a fixed scale (gaussian sigma, laplace scale)."}),
    (("--log-sigma-tensor",), {"metavar": "NAME", "default": None,
                               "help": "With --arch: the state-dict tensor holding log sigma (gaussian) or log scale (laplace)."}),
    (("--levels",), {"type": click.IntRange(2, MAX_LEVELS), "default": None,
                     "help": "With --arch: levels of a categorical or discretized_logistic likelihood."}),
    (("--decoder-output",), {"type": click.Choice(DECODER_OUTPUTS), "default": "logits", "show_default": True,
                             "help": "With --arch: what decode returns: logits (format-1 parameters), probs, or mean."}),
    (("--encode-method",), {"default": "encode", "show_default": True, "help": "With --arch: the encoding method."}),
    (("--decode-method",), {"default": "decode", "show_default": True, "help": "With --arch: the decoding method."}),
    (("--input-shape",), {"metavar": "SHAPE", "default": None,
                          "help": "With --arch: the shape encode takes per point, e.g. 784 or 1,28,28 (default: the data's)."}),
    (("--covariates",), {"metavar": "NAME,...", "default": None,
                         "help": "With --arch: arrays of the .npz DATA (obs columns of an .h5ad) passed to encode and decode "
                                 "per point as keyword arguments (a conditional model, evaluated as log p(x | covariates)). "
                                 "A format-1 model names its own."}),
)
_arch_options = _options(*(click.option(*names, **settings) for names, settings in _ARCH))
# compare: each --arch option once for every model, or once per model in the models' order
_ARCH_NAMES = tuple(names[0].lstrip("-").replace("-", "_") for names, _ in _ARCH)
_per_model_arch_options = _options(*(
    click.option(*names, **{**settings, "multiple": True, "default": (), "show_default": False,
                            "help": settings["help"] + " Once for all models, or once per model."})
    for names, settings in _ARCH
))


def _per_model(options: dict[str, Any], models: int) -> list[ArchOptions | None]:
    """Each model's --arch options (compare): an option given once holds for every model; ``-`` for --arch is a format-1 file."""
    given = {name: options.pop(name) for name in _ARCH_NAMES}
    defaults = {names[0].lstrip("-").replace("-", "_"): settings["default"] for names, settings in _ARCH}
    chosen: list[dict[str, Any]] = [{} for _ in range(models)]
    for name, values in given.items():
        if len(values) not in (0, 1, models):
            flag = f"--{name.replace('_', '-')}"
            raise click.UsageError(f"{flag} is given {len(values)} times for {models} models: give it once, or once per model")
        for index, picked in enumerate(chosen):
            picked[name] = defaults[name] if not values else values[0] if len(values) == 1 else values[index]
    for index, picked in enumerate(chosen):
        if picked["arch"] in (None, "-"):  # a format-1 file: the --arch options given for the others do not apply
            chosen[index] = dict(defaults)
    return [_arch(picked) for picked in chosen]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"{text!r} is not a shape like 784 or 1,28,28", param_hint="--input-shape")
    return shape


def _arch(options: dict[str, Any]) -> ArchOptions | None:
    """The --arch options, taken out of the command's options; None when --arch is not given."""
    arch = {name: options.pop(name) for name in ("arch", "decoder_output", "encode_method", "decode_method", *_ARCH_ONLY)}
    if arch["arch"] is None:
        given = [name for name in _ARCH_ONLY if arch[name] is not None]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} goes with --arch")
        return None
    if arch["likelihood"] is None:
        given = [name for name in _LIKELIHOOD_ONLY if arch[name] is not None]
        if given:
            raise click.UsageError(f"--{given[0].replace('_', '-')} goes with --likelihood")
    try:
        args = load_json(arch["arch_args"], "the JSON") if arch["arch_args"] else {}
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not JSON ({error})", param_hint="--arch-args") from None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--arch-args") from None
    if not isinstance(args, dict):
        raise click.BadParameter("must be a JSON object of keyword arguments", param_hint="--arch-args")
    return ArchOptions(
        spec=arch["arch"],
        likelihood=None if arch["likelihood"] is None else likelihood_spec(
            arch["likelihood"], sigma=arch["sigma"], log_sigma_tensor=arch["log_sigma_tensor"], levels=arch["levels"]
        ),
        args=args,
        decoder_output=arch["decoder_output"],
        encode_method=arch["encode_method"],
        decode_method=arch["decode_method"],
        encode_shape=_shape(arch["input_shape"]) if arch["input_shape"] else None,
        covariates=_names(arch["covariates"]) if arch["covariates"] else (),
    )


def _names(text: str) -> tuple[str, ...]:
    """``--covariates y,batch``: distinct Python identifiers, since they become keyword arguments."""
    names = tuple(part.strip() for part in text.split(","))
    bad = [name for name in names if not name.isidentifier()]
    if bad or not names:
        raise click.BadParameter(f"{bad[0] if bad else text!r} is not a name a keyword argument can have", param_hint="--covariates")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"{text!r} names a covariate twice", param_hint="--covariates")
    return names


_STREAMING = (
    click.option("--output", type=_PATH, default=None, metavar="FILE.jsonl",
                 help="Stream one JSON line per point as it is computed (plus a header and a summary line)."),
    click.option("--resume", is_flag=True, help="Continue the run in --output from the points it already holds."),
    click.option("--shard", default=None, metavar="I/N",
                 help="Evaluate only slice I of N (0-based) into --output; combine the parts with vaeeval merge."),
    click.option("--wait", is_flag=True, help="When another run is writing --output, wait for it instead of refusing."),
)


@main.command()
@click.argument("model", type=_PATH)
@click.argument("data", type=_PATH)
@_evaluation_options
@_arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.elbo/1) to stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every point in the table, not the first and worst.")
@click.option("--diagnostics", is_flag=True,
              help="Per-point standard errors, ESS and k-hat in the table, and the latent-health section.")
@click.option("--convergence", is_flag=True, help="IWAE at K = 1, 10, 100, ... from nested subsets of the samples.")
@click.option("--plot", type=_PATH, default=None, metavar="FILE.png",
              help="Draw the K-convergence curve and the per-point histogram (needs matplotlib).")
@_options(*_STREAMING)
@click.option("--fail-under", "fail_under", multiple=True, metavar="METRIC=VALUE",
              help="Exit 1 when the mean of elbo, recon or iwae is below VALUE (repeatable).")
def elbo(
    model: Path,
    data: Path,
    as_json: bool,
    show_all: bool,
    diagnostics: bool,
    convergence: bool,
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
    """
    thresholds = [Threshold.parse(text) for text in fail_under]
    streaming = _streaming(options)
    if streaming["streamed"] and (convergence or diagnostics or plot):
        raise click.UsageError(
            "--convergence, --diagnostics and --plot need the run's samples in one process; not with --output or --shard"
        )
    settings = _evaluation(options)
    loaded, dataset = load(model, data, arch=_arch(options), **options)
    _warn(loaded)
    if plot is not None:
        check_plot(plot, [model, data])
    outcome = _run(Evaluator(loaded, dataset, settings), streaming, "evaluating points", render_elbo)
    if outcome is None:  # under torchrun, not rank 0: rank 0 reports for everyone (or an empty shard)
        return
    result, about_model, about_data = outcome.evaluation, outcome.header["model"], outcome.header["data"]
    health = _latent_health(result, loaded) if diagnostics else None
    if plot is not None:
        plot_diagnostics(result, plot)
    if as_json:
        click.echo(to_json(elbo_document(result, about_model, about_data, convergence=convergence, latents=health)))
    else:
        render_elbo(_stdout(), result, about_model, about_data, show_all=show_all, diagnostics=diagnostics,
                    convergence=convergence, latents=health)
    check_thresholds(result.summary, thresholds)


def _streaming(options: dict[str, Any]) -> dict[str, Any]:
    """The --output, --resume, --shard and --wait options, taken out of the command's options and checked;
    ``streamed``: whether the run's points go to a file."""
    streaming = {name: options.pop(name) for name in ("output", "resume", "shard", "wait")}
    output, distributed = streaming["output"], distributed_world() is not None
    if streaming["resume"] and output is None:
        raise click.UsageError("--resume continues the run in --output: give --output")
    if streaming["shard"] is not None and (output is None or distributed):
        raise click.UsageError("--shard writes one part for vaeeval merge: give --output (and not under torchrun)")
    streaming["streamed"] = (output is not None or streaming["shard"] is not None) and not distributed
    return streaming


def _run(
    estimator: Evaluator | AISEvaluator,
    streaming: dict[str, Any],
    label: str,
    render: Callable[..., None],
) -> Outcome | None:
    """Run with a progress bar; when Ctrl-C stops it, ``render`` the points done and exit 130.

    ``streaming`` holds the --output, --resume, --shard and --wait options. None: nothing
    to report here (another torchrun rank reports, or the shard holds no point).
    """
    output, shard = streaming["output"], streaming["shard"]
    if output is not None:
        check_output(output, [estimator.dataset.path, estimator.model.path])
    part = None if shard is None else Shard.parse(shard, estimator.n)
    total = estimator.n if part is None else part.stop - part.start
    with _progress(total, label) as progress:
        outcome = run(estimator, output=output, resume=streaming["resume"], shard=part, wait=streaming["wait"],
                      progress=progress)
    if outcome is not None and outcome.interrupted:
        result = outcome.evaluation
        if result is None:
            click.echo("vaeeval: interrupted before any point was done", err=True)
            sys.exit(EXIT_INTERRUPTED)
        render(_stdout(), result, outcome.header["model"], outcome.header["data"])
        click.echo(
            f"vaeeval: interrupted after {result.summary.n} of {outcome.asked} points; the summary above is of those"
            + (f"; --resume continues {output}" if output else ""),
            err=True,
        )
        sys.exit(EXIT_INTERRUPTED)
    if outcome is not None and outcome.evaluation is None:
        click.echo(f"vaeeval: shard {shard} holds none of the {estimator.n} points; {output} is an empty part for vaeeval merge",
                   err=True)
        return None
    return outcome


def _latent_health(result: Evaluation, model: Model) -> LatentHealth:
    return latent_health(result.latent_means, result.latent_vars, result.points.kl, model.prior, result.settings.seed)


@main.command()
@click.argument("model", type=_PATH)
@click.argument("data", type=_PATH)
@_annealing_options
@_options(*_DATA)
@_arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.ais/1) to stdout.")
@click.option("--all", "show_all", is_flag=True, help="List every point in the table.")
@_options(*_STREAMING)
@click.option("--fail-under", "fail_under", multiple=True, metavar="METRIC=VALUE",
              help="Exit 1 when the mean of ais, elbo or iwae is below VALUE (repeatable).")
def ais(
    model: Path,
    data: Path,
    as_json: bool,
    show_all: bool,
    fail_under: tuple[str, ...],
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
    streaming = _streaming(options)
    annealing, settings = _annealing(options), _evaluation(options)
    loaded, dataset = load(model, data, arch=_arch(options), **options)
    _warn(loaded)
    started = time.monotonic()
    outcome = _run(AISEvaluator(loaded, dataset, annealing, settings), streaming, "annealing", render_ais)
    if outcome is None:
        return
    result, about_model, about_data = outcome.evaluation, outcome.header["model"], outcome.header["data"]
    if as_json:
        click.echo(to_json(ais_document(result, about_model, about_data)))
    else:
        render_ais(_stdout(), result, about_model, about_data, show_all=show_all, seconds=time.monotonic() - started)
    check_thresholds(result.summary, thresholds)


@main.command()
@click.argument("model", type=_PATH)
@click.option("--n", "n", type=click.IntRange(1, MAX_SIMULATED), default=100, show_default=True,
              help="Points to simulate from the model.")
@_annealing_options
@_arch_options
@click.option("--save-data", type=_PATH, default=None, metavar="FILE.npz", help="Write the simulated x and z.")
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
    annealing, settings = _annealing(options), _evaluation(options)
    arch = _arch(options)
    if arch is None:
        loaded = load_model(model)
    elif arch.encode_shape is None:
        raise click.UsageError("bdmc --arch needs --input-shape: the shape of one data point")
    else:
        loaded = arch_model(model, replace(arch, encode_shape=None), arch.encode_shape)
    simulated = simulate(loaded, n, seed=settings.seed, levels=simulation_levels(loaded, settings.discretize, settings.density))
    if save_data is not None:
        check_output(save_data, [model], parameter="save_data")
        save_simulated(save_data, simulated)
    evaluator = BDMCEvaluator(loaded, simulated, annealing, settings)
    started = time.monotonic()
    with _progress(n, "annealing both ways") as progress:
        result = evaluator.evaluate(progress)
    document = bdmc_document(result, loaded, simulated, str(save_data) if save_data else None)
    if as_json:
        click.echo(to_json(document))
    else:
        render_bdmc(_stdout(), result, document["model"], document["data"], show_all=show_all,
                    seconds=time.monotonic() - started)


@main.command()
@click.argument("model", type=_PATH)
@click.argument("data", type=_PATH)
@_evaluation_options
@_arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.latents/1) to stdout.")
def latents(model: Path, data: Path, as_json: bool, **options: Any) -> None:
    """Latent health: KL per unit, active units, I(x; z) under q, and the aggregate-posterior KL.

    A unit is active when Var_x(E_q[z_u]) > 0.01 (Burda et al. 2016). The mutual
    information uses the aggregate posterior over the whole data set; by ELBO
    surgery, mean KL = I(x; z) + KL(q(z) || p(z)).

    \b
    Example:
      vaeeval latents sample_models/digits_bernoulli.safetensors sample_models/digits_binary_test.npy
    """
    settings = _evaluation(options)
    loaded, dataset = load(model, data, arch=_arch(options), **options)
    _warn(loaded)
    with _progress(dataset.n, "evaluating points") as progress:
        result = Evaluator(loaded, dataset, settings).evaluate(progress)
    health = _latent_health(result, loaded)
    if as_json:
        click.echo(to_json(latents_document(health, loaded, dataset, result)))
    else:
        render_latents(_stdout(), health)


@main.command()
@click.argument("model", type=_PATH)
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
        render_inspect(_stdout(), loaded)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=_PATH, metavar="MODEL... DATA")
@_evaluation_options
@click.option("--estimator", type=click.Choice(("iwae", "ais")), default="iwae", show_default=True,
              help="Rank by the importance-weighted estimate, or by annealed importance sampling (the options below).")
@_options(*_ANNEALING)
@_per_model_arch_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (vaeeval.compare/1) to stdout.")
def compare(paths: tuple[Path, ...], estimator: str, as_json: bool, **options: Any) -> None:
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
    annealing = _annealing(options)
    if click.get_current_context().get_parameter_source("batch_size") is ParameterSource.DEFAULT:
        annealing = replace(annealing, batch_size=None)  # the batch for the importance samples; AIS plans its own
    settings = _evaluation(options)
    archs = _per_model(options, len(model_paths))
    loaded = [load(path, data, arch=arch, **options) for path, arch in zip(model_paths, archs, strict=True)]
    for model, _ in loaded:
        _warn(model)
    models, datasets = [model for model, _ in loaded], [dataset for _, dataset in loaded]
    with _progress(datasets[0].n * len(models), "evaluating models") as progress:
        result = compare_models(models, datasets, settings, annealing=annealing if estimator == "ais" else None,
                                progress=progress)
    if as_json:
        click.echo(to_json(compare_document(result, datasets[0])))
    else:
        render_compare(_stdout(), result, datasets[0])


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


@main.command()
@click.argument("weights", type=_PATH)
@_arch_options
@click.option("-o", "--output", type=_PATH, required=True, help="The format-1 file to write.")
@click.option("--data", type=_PATH, default=None,
              help="Points to verify on (default: 64 drawn from the likelihood's support); also gives the input shape.")
@click.option("--key", default=None, help="The array to use from an .npz --data file.")
@click.option("--layer", default=None, metavar="NAME", help="The AnnData layer holding the points in an .h5ad --data file (default X).")
@click.option("-k", "--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Samples per point for the verification.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Noise seed for the verification.")
@click.option("--allow-unused", is_flag=True, help="Write the file even when state-dict tensors would be left out of it.")
@click.option("--from", "source", type=click.Choice(["scvi"]), default=None,
              help="WEIGHTS is the folder SCVI.save wrote (RUNS scvi-tools' LOADER, which unpickles model.pt).")
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

    \b
    Example:
      vaeeval convert weights.safetensors --arch vae.py:VAE --likelihood bernoulli \\
        --decoder-output probs --input-shape 784 -o model.safetensors
      vaeeval convert --from scvi my_scvi_model/ -o scvi.safetensors
    """
    if source == "scvi":
        _convert_scvi(weights, output, options, data=data, seed=seed)
        return
    arch = _arch(options)
    if arch is None:
        raise click.UsageError("convert needs --arch: the class that reads WEIGHTS")
    if arch.covariates:
        raise click.UsageError("convert: format 1 holds no covariates; evaluate a conditional model with --arch")
    if arch.encode_shape is None and data is None:
        raise click.UsageError("convert needs --input-shape or --data: the shape of one data point")
    check_output(output, [weights, data, Path(arch.spec.rpartition(":")[0])])
    shape = arch.encode_shape or point_shape(data, key=key, layer=layer)
    source = arch_model(weights, replace(arch, encode_shape=None), shape)
    points = None if data is None else load_data(data, source, key=key, layer=layer, limit=64).array
    result = convert_model(source, output, data=points, samples=samples, seed=seed, allow_unused=allow_unused)
    layers = result.model.layers
    encoder_layers = sum(layer.part == "encoder" for layer in layers)
    left_out = f"; left out (--allow-unused): {listing(result.unused, 6, counted=True)}" if result.unused else ""
    click.echo(
        f"wrote {result.path}: format 1, {encoder_layers} encoder and {len(layers) - encoder_layers} decoder layers, "
        f"{result.model.likelihood.family} likelihood, {result.model.prior.family} prior; verified on {result.points} "
        f"points, K = {result.samples}, seed {result.seed}: largest difference {result.largest_difference:.2g} nats{left_out}"
    )


@main.command()
@click.argument("new", type=_PATH)
@click.option("--baseline", type=_PATH, required=True, help="The earlier run: an elbo --json document or results file.")
@click.option("--metric", type=click.Choice(CHECKED), default="iwae", show_default=True,
              help="The metric to compare (ais for two ais runs).")
@click.option("--tolerance", type=_Finite(0.0), default=0.0, show_default=True,
              help="How many nats per point the metric may drop before the check fails.")
@click.option("--confidence", type=_Finite(0.5, 1.0), default=0.95, show_default=True,
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


@main.command()
@click.argument("parts", nargs=-1, required=True, type=_PATH)
@click.option("--json", "as_json", is_flag=True, help="Print the vaeeval.elbo/1 document a single run gives.")
@click.option("--output", type=_PATH, default=None, metavar="FILE.jsonl", help="Write the results file a single run gives.")
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
    document, render = _MERGED[merged.header["schema"]]
    if as_json:
        click.echo(to_json(document(merged.evaluation, model, data)))
    elif output is None:
        render(_stdout(), merged.evaluation, model, data, show_all=show_all)


# what a merged results file is shown as: its --json document and its table
_MERGED = {ELBO_RESULTS.schema: (elbo_document, render_elbo), AIS_RESULTS.schema: (ais_document, render_ais)}


@main.command()
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
