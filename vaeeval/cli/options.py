"""The options commands share, parsed into the library's settings, and the run with a progress bar."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vaeeval.cli.group import EXIT_INTERRUPTED
from vaeeval.estimators.annealing.ais import (
    DEFAULT_CHAINS,
    DEFAULT_LEAPFROG,
    DEFAULT_PILOT_CHAINS,
    DEFAULT_STEPS,
    INITS,
    MASSES,
    MAX_CHAINS,
    MAX_LEAPFROG,
    MAX_SIMULATED,
    MAX_STEPS,
    SCHEDULE_CHOICES,
    AISEvaluator,
    AISOptions,
)
from vaeeval.estimators.annealing.certify import DEFAULT_CERTIFY_POINTS, DEFAULT_MAX_COST
from vaeeval.estimators.annealing.kernel import SCALED_STEP_SIZE_RANGE
from vaeeval.estimators.importance.enumeration import DEFAULT_MAX_SUPPORT
from vaeeval.estimators.importance.evaluate import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_SAMPLES,
    MAX_BATCH_SIZE,
    MAX_SAMPLES,
    EvaluationOptions,
    Evaluator,
)
from vaeeval.format.likelihoods import families, likelihood_spec
from vaeeval.format.model import Model
from vaeeval.format.specs import MAX_LEVELS
from vaeeval.io.files import check_output, load_json
from vaeeval.output.progress import ProgressBar
from vaeeval.runs.formats import Shard
from vaeeval.runs.run import DEFAULT_DIST_TIMEOUT, MAX_DIST_TIMEOUT, Outcome, distributed_world, run
from vaeeval.user.arch import ArchOptions
from vaeeval.user.methods import DECODER_OUTPUTS

if TYPE_CHECKING:
    from rich.console import Console

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)

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


class Span(click.ParamType):
    """``LO,HI``: two finite numbers with LO < HI."""

    name = "LO,HI"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, float]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        try:
            low, high = (float(part) for part in parts)
        except ValueError:
            self.fail(f"{value!r} is not two numbers LO,HI such as 0,255 or -1,1", param, ctx)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            self.fail(f"{value!r} needs two finite numbers with LO < HI", param, ctx)
        return low, high


class Finite(click.ParamType):
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


class Seconds(float):
    """A budget in seconds (``--max-cost 600s``), told apart from one in gradient evaluations (an int)."""


class CostBudget(click.ParamType):
    """``--max-cost``: N gradient evaluations, or Ns seconds."""

    name = "budget"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | Seconds:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        try:
            return Seconds(float(text[:-1])) if text.endswith("s") else int(text)
        except ValueError:
            self.fail(f"{value!r} is neither a number of gradient evaluations (1000000) nor of seconds (600s)", param, ctx)


def budget(value: int | Seconds) -> tuple[int | None, float | None]:
    """``--max-cost`` as (gradient evaluations, seconds), one of them None."""
    return (None, float(value)) if isinstance(value, Seconds) else (value, None)


PATH = click.Path(path_type=Path, dir_okay=True, exists=False)


def stdout() -> Console:
    """Where tables go: the terminal's width, or 120 columns into a file or pipe (not rich's 80)."""
    from rich.console import Console

    console = Console()
    console = console if console.is_terminal else Console(width=120)
    console.on_broken_pipe = _broken_pipe  # rich would exit 1 (a failed check); the group ends with 141
    return console


def _broken_pipe() -> None:
    raise BrokenPipeError("stdout was closed")


def table(name: str) -> Callable[..., None]:
    """The renderer ``module.function`` of ``vaeeval.output``, imported when a table is drawn: rich
    loads only then, so a ``--json`` run starts without it."""
    module, _, function = name.rpartition(".")
    return getattr(importlib.import_module(f"vaeeval.output.{module}"), function)


def warn(model: Model) -> None:
    """The model's warnings (a likely misread decoder), one line each on stderr, besides the output's notes."""
    for note in model.notes:
        if note.startswith("warning: "):
            click.echo(f"vaeeval: {note}", err=True)


def progress_bar(total: int, label: str) -> ProgressBar:
    def console() -> Console:
        from rich.console import Console

        return Console(stderr=True)

    return ProgressBar(total, label, console)


def option_group(*decorators: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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
DATA = (
    click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N points."),
    click.option("--key", default=None,
                 help="The array to use from an .npz file that holds several; the column of a parquet, Arrow or saved-dataset DATA."),
    click.option("--layer", default=None, metavar="NAME",
                 help="The AnnData layer holding the data in an .h5ad DATA file; default: the one the model file records, else X."),
    click.option("--max-data-size", type=_ByteSize(), default=None, show_default="half the memory",
                 help="Refuse an .npz array that would inflate to more than this, e.g. 4G."),
    click.option("--rescale", type=Span(), default=None, metavar="LO,HI",
                 help="DATA's values run from LO to HI in its own units (0,255 for 8-bit pixels): map them linearly "
                      "onto the model's range ([0, 1] unless it declares another) as they are read."),
)


_DEVICE = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
_SCORING = (
    click.option("--discretize", type=click.IntRange(2, MAX_LEVELS), default=None, metavar="L",
                 help="Score continuous likelihoods as the probability of each value's bin on L levels."),
    click.option("--density", is_flag=True,
                 help="Keep continuous likelihoods' densities even when the data is discrete."),
    click.option("--range", "grid_range", type=Span(), default=None, metavar="LO,HI",
                 help="The values the --discretize grid spans, LO + k (HI - LO)/(L - 1): -1,1 or 0,255 "
                      "(default: the data's own grid, else 0,1)."),
)
evaluation_options = option_group(_SAMPLES, _SEED, _BATCH_SIZE, _MAX_MEMORY, *DATA, _DEVICE, *_SCORING)


def evaluation_settings(options: dict[str, Any]) -> EvaluationOptions:
    """The evaluation settings, taken out of the command's options."""
    return EvaluationOptions(
        samples=options.pop("samples"),
        seed=options.pop("seed"),
        batch_size=options.pop("batch_size") or DEFAULT_BATCH_SIZE,
        max_memory=options.pop("max_memory"),
        device=options.pop("device"),
        discretize=options.pop("discretize"),
        density=options.pop("density"),
        grid_range=options.pop("grid_range"),
        enumerate_latent=options.pop("enumerate_latent", None),
        max_support=options.pop("max_support", DEFAULT_MAX_SUPPORT),
    )


ENUMERATION = (
    click.option("--enumerate/--no-enumerate", "enumerate_latent", default=None,
                 help="A discrete latent (Bernoulli, categorical): log p(x), ELBO and KL exact by summing over every value "
                      "of z [default: when z takes at most --max-support values]."),
    click.option("--max-support", type=click.IntRange(min=1), default=DEFAULT_MAX_SUPPORT, show_default=True, metavar="N",
                 help="The most values of z summed over (--enumerate)."),
)


ANNEALING = (
    click.option("--steps", type=click.IntRange(min=1, max=MAX_STEPS), default=DEFAULT_STEPS, show_default=True,
                 help="T, annealing steps from the initial distribution to the posterior."),
    click.option("--schedule", type=click.Choice(SCHEDULE_CHOICES), default="sigmoid", show_default=True,
                 help="How the steps are spaced in β (sigmoid: dense at both ends, as Wu et al. 2017; adaptive: "
                      "placed per point by the pilot for equal variance of the weight increments)."),
    click.option("--leapfrog", type=click.IntRange(1, MAX_LEAPFROG), default=DEFAULT_LEAPFROG, show_default=True,
                 help="Leapfrog steps per HMC transition."),
    click.option("--chains", type=click.IntRange(1, MAX_CHAINS), default=DEFAULT_CHAINS, show_default=True,
                 help="C, independent chains per point."),
    click.option("--init", type=click.Choice(INITS), default="auto", show_default=True,
                 help="Start from q(z|x) (encoder), from p(z) (prior), or per point from p(z) where a pilot from it "
                      "had a mean log-weight higher by more than a quarter nat than one from q(z|x) (auto)."),
    click.option("--step-size", type=Finite(*SCALED_STEP_SIZE_RANGE), default=None, metavar="E",
                 help="A fixed HMC step size; by default a pilot run tunes one per point and step."),
    click.option("--mass", type=click.Choice(MASSES), default="identity", show_default=True,
                 help="HMC's mass matrix: identity, or diagonal (1 / q0's variances per point; ε in units of q0's "
                      "standard deviations)."),
    click.option("--pilot-chains", type=click.IntRange(1, MAX_CHAINS), default=DEFAULT_PILOT_CHAINS, show_default=True,
                 help="Chains per point in each pilot run (it tunes ε, fits the adaptive schedule and, with --init "
                      "auto, chooses q0)."),
)
CERTIFY = (
    click.option("--target-gap", "target_gap", type=float, default=None, metavar="G",
                 help="First find settings whose BDMC gap on simulated points is certified below G nats "
                      "(doubling --steps, then --leapfrog), then run AIS on DATA at them; exit 1 if --max-cost runs out."),
    click.option("--max-cost", "max_cost", type=CostBudget(), default=DEFAULT_MAX_COST, show_default=True,
                 metavar="N|Ts", help="With --target-gap: the budget of the certification, in gradient evaluations "
                                      "(N) or seconds (600s)."),
    click.option("--certify-points", "certify_points", type=click.IntRange(2, MAX_SIMULATED),
                 default=DEFAULT_CERTIFY_POINTS, show_default=True,
                 metavar="N", help="With --target-gap: points simulated from the model for the certification."),
)
annealing_options = option_group(
    *ANNEALING,
    _SAMPLES,
    _SEED,
    click.option("--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=None,
                 help="Points annealed together (default: about 2048 chains in the memory budget). Results do not depend on it."),
    _MAX_MEMORY, _DEVICE, *_SCORING,
)


def annealing_settings(options: dict[str, Any]) -> AISOptions:
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
        mass=options.pop("mass"),
    )


_ARCH_ONLY = ("arch_args", "likelihood", "sigma", "log_sigma_tensor", "levels", "input_shape", "covariates", "lengths")
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
    (("--sigma",), {"type": Finite(0.0, low_open=True), "default": None,
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
    (("--lengths",), {"metavar": "NAME|FILE.npy", "default": None,
                      "help": "With --arch: the data are padded sequences; an array of the .npz DATA (or a .npy file) of "
                              "each sequence's length [N], or a 0/1 mask [N, T]: positions past it leave log p(x|z), and the "
                              "output adds NLL per token, perplexity and bits per token."}),
)
arch_options = option_group(*(click.option(*names, **settings) for names, settings in _ARCH))
# compare: each --arch option once for every model, or once per model in the models' order
_ARCH_NAMES = tuple(names[0].lstrip("-").replace("-", "_") for names, _ in _ARCH)
per_model_arch_options = option_group(*(
    click.option(*names, **{**settings, "multiple": True, "default": (), "show_default": False,
                            "help": settings["help"] + " Once for all models, or once per model."})
    for names, settings in _ARCH
))


def per_model_arch(options: dict[str, Any], models: int) -> list[ArchOptions | None]:
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
    return [arch_settings(picked) for picked in chosen]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"{text!r} is not a shape like 784 or 1,28,28", param_hint="--input-shape")
    return shape


def arch_settings(options: dict[str, Any]) -> ArchOptions | None:
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
        lengths=_lengths(arch["lengths"], arch["covariates"]),
    )


def _lengths(lengths: str | None, covariates: str | None) -> str | None:
    """``--lengths``: not also one of the ``--covariates`` (the lengths reach encode and decode by their own names)."""
    if lengths is not None and covariates and lengths in _names(covariates):
        raise click.BadParameter(f"{lengths} is also in --covariates; give it once, as --lengths", param_hint="--lengths")
    return lengths


def _names(text: str) -> tuple[str, ...]:
    """``--covariates y,batch``: distinct Python identifiers, since they become keyword arguments."""
    names = tuple(part.strip() for part in text.split(","))
    bad = [name for name in names if not name.isidentifier()]
    if bad or not names:
        raise click.BadParameter(f"{bad[0] if bad else text!r} is not a name a keyword argument can have", param_hint="--covariates")
    if len(set(names)) != len(names):
        raise click.BadParameter(f"{text!r} names a covariate twice", param_hint="--covariates")
    return names


STREAMING = (
    click.option("--output", type=PATH, default=None, metavar="FILE.jsonl",
                 help="Stream one JSON line per point as it is computed (plus a header and a summary line)."),
    click.option("--resume", is_flag=True, help="Continue the run in --output from the points it already holds."),
    click.option("--shard", default=None, metavar="I/N",
                 help="Evaluate only slice I of N (0-based) into --output; combine the parts with vaeeval merge."),
    click.option("--wait", is_flag=True, help="When another run is writing --output, wait for it instead of refusing."),
    click.option("--dist-timeout", type=Finite(0.0, MAX_DIST_TIMEOUT, low_open=True), default=DEFAULT_DIST_TIMEOUT,
                 show_default=True, metavar="SECONDS",
                 help="Under torchrun: how long the processes wait for each other to start before the run ends with an error. "
                      "It does not bound the evaluation: the results are gathered when the slowest process is done."),
)


def streaming_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The --output, --resume, --shard, --wait and --dist-timeout options, taken out of the command's options and
    checked; ``streamed``: whether the run's points go to a file."""
    streaming = {name: options.pop(name) for name in ("output", "resume", "shard", "wait", "dist_timeout")}
    output, distributed = streaming["output"], distributed_world() is not None
    if streaming["resume"] and output is None:
        raise click.UsageError("--resume continues the run in --output: give --output")
    if streaming["shard"] is not None and (output is None or distributed):
        raise click.UsageError("--shard writes one part for vaeeval merge: give --output (and not under torchrun)")
    streaming["streamed"] = (output is not None or streaming["shard"] is not None) and not distributed
    return streaming


def run_with_progress(
    estimator: Evaluator | AISEvaluator,
    streaming: dict[str, Any],
    label: str,
    render: str,
) -> Outcome | None:
    """Run with a progress bar; when Ctrl-C stops it, draw the points done with the table ``render``
    (``tables.render_elbo``: see ``table``) and exit 130.

    ``streaming`` holds the --output, --resume, --shard, --wait and --dist-timeout options. None: nothing
    to report here (another torchrun rank reports, or the shard holds no point).
    """
    output, shard = streaming["output"], streaming["shard"]
    if output is not None:
        check_output(output, [estimator.dataset.path, estimator.model.path])
    part = None if shard is None else Shard.parse(shard, estimator.n)
    total = estimator.n if part is None else part.stop - part.start
    with progress_bar(total, label) as progress:
        outcome = run(estimator, output=output, resume=streaming["resume"], shard=part, wait=streaming["wait"],
                      progress=progress, dist_timeout=streaming["dist_timeout"])
    if outcome is not None and outcome.interrupted:
        result = outcome.evaluation
        if result is None:
            click.echo("vaeeval: interrupted before any point was done", err=True)
            sys.exit(EXIT_INTERRUPTED)
        table(render)(stdout(), result, outcome.header["model"], outcome.header["data"])
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
