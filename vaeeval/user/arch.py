"""Bring your own architecture: evaluate a user's PyTorch VAE class through a small protocol.

``--arch`` names a class or factory (``path/to/file.py:VAE``, ``package.module:make_vae``,
or a name registered under the entry-point group ``vaeeval.architectures``). It is
the only way vaeeval runs code that is not its own, and only the code the user
names. The object it builds must be a ``torch.nn.Module`` with:

* ``encode(x)`` returning ``(mean, log_var)``, each ``[B, latent_dim]``, or a
  ``torch.distributions.Normal`` / ``Independent(Normal)``;
* ``decode(z)`` returning the likelihood's parameters (a tensor, or a tuple of
  tensors for P > 1) with P x D values per point.

The weights come from a safetensors state dict, loaded strictly. Decoders that
return probabilities (``--decoder-output probs``, e.g. a final sigmoid) are read
as logits: where ``decode`` can be traced, the final sigmoid is skipped, which
is exact; otherwise the probabilities are clamped to [eps, 1 - eps] as
torch.distributions does, and the model's description says so.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.distributions import Distribution, Independent, Normal
from torch.distributions.utils import probs_to_logits

from vaeeval.core import rng
from vaeeval.errors import VaeevalError, listing, option
from vaeeval.format.data import covariate_dtype
from vaeeval.format.likelihoods import BINARY, CATEGORICAL, Likelihood, likelihood_from_spec
from vaeeval.format.model import Model, read_safetensors
from vaeeval.format.priors import prior_from_spec
from vaeeval.io.files import file_digest
from vaeeval.user.calls import call_user, first_line, where
from vaeeval.user.distributions import describe
from vaeeval.user.protocol import (
    ASSUMED,
    ArchModel,
    DistributionLikelihood,
    DistributionPrior,
    as_posterior,
    diagonal,
    standard_normal,
)

ENTRY_POINT_GROUP = "vaeeval.architectures"
DECODER_OUTPUTS = ("logits", "probs", "mean")
_SHAPE_ONLY = {"view", "reshape", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze"}


@dataclass(frozen=True)
class ArchOptions:
    """How to read a user's model through the protocol.

    Attributes:
        spec: ``file.py:Attr``, ``package.module:attr`` or a registered name.
        args: keyword arguments for the class or factory.
        likelihood: a format-1 likelihood block (tensor names refer to the weights file); none
            when ``decode`` returns a distribution.
        decoder_output: ``logits`` (the family's format-1 parameters), ``probs``
            (probabilities) or ``mean`` (the distribution's mean).
        encode_method, decode_method: the methods to call.
        encode_shape: the shape ``encode`` takes per point, when it differs from the data's.
        covariates: names of the data file's arrays passed to ``encode`` and ``decode`` as
            keyword arguments, per point.
    """

    spec: str
    likelihood: Mapping[str, Any] | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    decoder_output: str = "logits"
    encode_method: str = "encode"
    decode_method: str = "decode"
    encode_shape: tuple[int, ...] | None = None
    covariates: tuple[str, ...] = ()


def registered_architectures() -> dict[str, importlib.metadata.EntryPoint]:
    """Names registered by installed packages under the ``vaeeval.architectures`` entry-point group."""
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise VaeevalError(f"{option('arch')} {spec}: {path}: no such file")
    name = f"vaeeval_arch_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # while it runs, as for any import (dataclasses look themselves up there)
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code: any failure is reported, in one line
        raise VaeevalError(f"{option('arch')} {spec}: running {path} raised {first_line(error)}{where(error)}") from None
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(path.resolve().parent))
    return module


def _import_module(spec: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise VaeevalError(f"{option('arch')} {spec}: importing {name} raised {first_line(error)}") from None


def load_architecture(spec: str) -> Callable[..., Any]:
    """The class or factory ``spec`` names. Runs the user's code (importing it).

    Raises:
        VaeevalError: no such file, module, attribute or registered name, or an import that raised.
    """
    if ":" not in spec:
        registered = registered_architectures()
        if spec not in registered:
            known = ", ".join(sorted(registered)) or "none are installed"
            raise VaeevalError(
                f"{option('arch')} {spec}: not FILE.py:NAME, package.module:NAME or a registered architecture ({known})"
            )
        try:
            return registered[spec].load()
        except Exception as error:
            raise VaeevalError(f"{option('arch')} {spec}: loading its entry point raised {first_line(error)}") from None
    source, _, attribute = spec.rpartition(":")
    looks_like_file = source.endswith(".py") or "/" in source or "\\" in source
    module = _import_file(spec, Path(source)) if looks_like_file else _import_module(spec, source)
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise VaeevalError(
                f"{option('arch')} {spec}: {source} has no attribute {attribute!r} (it defines {', '.join(public) or 'nothing callable'})"
            )
        target = getattr(target, part)
    return target


def build_module(spec: str, factory: Callable[..., Any], args: Mapping[str, Any]) -> nn.Module:
    """Call the class or factory with ``args``; the result must be an ``nn.Module``."""
    if isinstance(factory, nn.Module):
        if args:
            raise VaeevalError(f"{option('arch')} {spec}: names a module instance, which takes no {option('arch_args')}")
        module = factory
    else:
        try:
            module = factory(**args)
        except Exception as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
            raise VaeevalError(f"{option('arch')} {spec}: {spec.rpartition(':')[2]}({shown}) raised {first_line(error)}") from None
    if not isinstance(module, nn.Module):
        raise VaeevalError(f"{option('arch')} {spec}: built a {type(module).__name__}, not a torch.nn.Module")
    return module


def load_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, spec: str, extra: Sequence[str] = ()) -> None:
    """Load ``tensors`` into ``module`` strictly; every mismatch is listed in one error.

    Args:
        extra: tensor names the file may hold beyond the module's state dict (a likelihood tensor).
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected and name not in extra]
    wrong = [
        f"{name} is {list(tensors[name].shape)} in the file, {list(expected[name].shape)} in the module"
        for name in expected
        if name in tensors and tuple(tensors[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {listing(missing, 6, counted=True)}")
    if unexpected:
        problems.append(f"unexpected {listing(unexpected, 6, counted=True)}")
    problems.extend(wrong[:5])
    if problems:
        raise VaeevalError(f"{path}: does not fit {option('arch')} {spec}: " + "; ".join(problems))
    module.load_state_dict({name: tensors[name] for name in expected}, strict=True)


# ---------------------------------------------------------------- the protocol


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


class EncoderAdapter(nn.Module):
    """x ``[B, *input_shape]`` -> ``[B, 2 latent_dim]`` (means, then log-variances) through ``encode``."""

    def __init__(self, module: nn.Module, method: str, encode_shape: tuple[int, ...] | None) -> None:
        super().__init__()
        self.module, self.method, self.encode_shape = module, method, encode_shape

    def call(self, x: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> Any:
        """What ``encode(x, **covariates)`` returns, ``x`` reshaped as ``encode`` takes it."""
        if self.encode_shape is not None:
            x = x.reshape(x.shape[0], *self.encode_shape)
        return call_user(f"{self.method}(x)", partial(getattr(self.module, self.method), **(covariates or {})), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.call(x)
        if isinstance(output, Independent):
            output = output.base_dist
        if isinstance(output, Normal):
            mean, log_var = output.loc, 2 * output.scale.log()
        elif isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output):
            mean, log_var = output
        else:
            raise VaeevalError(
                f"{self.method}(x) returned {_describe(output)}; vaeeval needs (mean, log_var) or a "
                "torch.distributions.Normal"
            )
        rows = x.shape[0]
        if mean.shape != log_var.shape or mean.dim() != 2 or mean.shape[0] != rows:
            raise VaeevalError(
                f"{self.method}(x) returned a mean of {list(mean.shape)} and a log-variance of {list(log_var.shape)} "
                f"for {rows} points; both must be [{rows}, latent_dim]"
            )
        return torch.cat([mean, log_var], dim=1)


class DecoderAdapter(nn.Module):
    """z ``[B, latent_dim]`` -> the likelihood's format-1 parameters ``[B, P*D]`` through ``decode``."""

    def __init__(
        self,
        module: nn.Module,
        method: str,
        probabilities: str | None,
        logits_graph: nn.Module | None,
        untraced: str | None = None,
        levels: int | None = None,
    ) -> None:
        super().__init__()
        self.module, self.method, self.untraced = module, method, untraced  # untraced: why there is no logits_graph
        self.levels = levels  # of a categorical decoder giving probabilities, which must sum to one over them
        self.probabilities = probabilities  # None, "binary" or "categorical": how to turn probs into logits
        self.logits_graph = logits_graph  # decode with its final sigmoid skipped, when it could be traced

    def call(self, z: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> Any:
        """What ``decode(z, **covariates)`` returns: a distribution as it is, parameters as format-1 parameters."""
        if self.logits_graph is not None and not covariates:
            return self(z)
        output = call_user(f"{self.method}(z)", partial(getattr(self.module, self.method), **(covariates or {})), z)
        return output if isinstance(output, Distribution) else self._format1(output, z.shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.logits_graph is not None:
            return _rows(_flat(call_user(f"{self.method}(z)", self.logits_graph, z), self.method), z.shape[0], self.method)
        return self._format1(call_user(f"{self.method}(z)", getattr(self.module, self.method), z), z.shape[0])

    def _format1(self, raw: Any, rows: int) -> torch.Tensor:
        output = _rows(_flat(raw, self.method), rows, self.method)
        if self.probabilities is None:
            return output
        outside = ~((output >= 0) & (output <= 1))
        if outside.any():
            raise VaeevalError(
                f"{self.method}(z) gave {output[outside][0].item():.6g}, outside [0, 1], but "
                f"{option('decoder_output')} says probabilities"
            )
        if self.probabilities == CATEGORICAL:
            sums = output.reshape(rows, self.levels, -1).double().sum(1)
            worst = int((sums - 1).abs().argmax())
            if abs(float(sums.flatten()[worst]) - 1) > 1e-3:
                raise VaeevalError(
                    f"{self.method}(z)'s probabilities sum to {float(sums.flatten()[worst]):.6g} over the {self.levels} levels at "
                    f"dimension {worst % sums.shape[1]}; format 1 reads them as [levels, *input_shape] per point, each "
                    "dimension's levels summing to one"
                )
        return probs_to_logits(output, is_binary=self.probabilities == BINARY)


def _rows(output: torch.Tensor, rows: int, method: str) -> torch.Tensor:
    if output.shape[0] != rows:
        raise VaeevalError(f"{method}(z) returned {output.shape[0]} rows for {rows} latent vectors; it must return one per vector")
    return output


def _flat(output: Any, method: str) -> torch.Tensor:
    parts = [output] if isinstance(output, torch.Tensor) else output
    if (
        not isinstance(parts, (tuple, list))
        or not parts
        or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == parts[0].shape[0] for t in parts)
    ):
        raise VaeevalError(
            f"{method}(z) returned {_describe(output)}; vaeeval needs a tensor of the likelihood's parameters "
            "(or a tuple of them), one row per latent vector"
        )
    return torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1) if len(parts) > 1 else parts[0].reshape(parts[0].shape[0], -1)


class MethodModule(nn.Module):
    """``module.method`` as a module's forward, so torch.fx can trace it."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor) -> Any:
        return getattr(self.module, self.method)(x)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, taking NumPy scalars (``x.reshape(-1, np.prod(self.input_dim))``) as the numbers they are."""

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, np.generic):
            return a.item()
        return super().create_arg(a)


def trace(module: nn.Module, method: str) -> fx.GraphModule:
    """``module.method`` traced by torch.fx.

    Raises:
        VaeevalError: it cannot be traced; the message names the file, line and expression where tracing stopped.
    """
    root = MethodModule(module, method)
    try:
        graph = _Tracer().trace(root)
    except Exception as error:  # whatever the user's code does under tracing
        raise VaeevalError(f"{method} cannot be traced by torch.fx: {first_line(error)}{where(error)}") from None
    return fx.GraphModule(root, graph)


_SIGMOIDS = (torch.sigmoid, torch.nn.functional.sigmoid)
_SOFTMAXES = (torch.softmax, torch.nn.functional.softmax)


def _squash(graph_module: fx.GraphModule, node: fx.Node) -> str | None:
    """``binary`` for an elementwise sigmoid, ``categorical`` for a softmax, as a function, method or module."""
    if node.op == "call_function":
        target = node.target
    elif node.op == "call_method":
        return BINARY if node.target == "sigmoid" else CATEGORICAL if node.target == "softmax" else None
    elif node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        return BINARY if isinstance(module, nn.Sigmoid) else CATEGORICAL if isinstance(module, nn.Softmax) else None
    else:
        return None
    return BINARY if target in _SIGMOIDS else CATEGORICAL if target in _SOFTMAXES else None


def final_squash(graph_module: fx.GraphModule, kind: str) -> fx.Node | None:
    """The sigmoid (``binary``) or softmax (``categorical``) the output comes from, through reshapes only, if any."""
    (output,) = [n for n in graph_module.graph.nodes if n.op == "output"]
    node = output.args[0]
    while isinstance(node, fx.Node):
        if _squash(graph_module, node) == kind:
            return node if len(node.users) == 1 else None
        if node.op == "call_method" and node.target in _SHAPE_ONLY or (
            node.op == "call_function" and node.target in (torch.flatten, torch.reshape)
        ):
            node = node.args[0]
            continue
        return None
    return None


def skip_final_squash(graph_module: fx.GraphModule, kind: str) -> bool:
    """Remove the final sigmoid or softmax from the graph (the output is then its input); False when there is none."""
    squash = final_squash(graph_module, kind)
    if squash is None:
        return False
    squash.replace_all_uses_with(squash.args[0])
    graph_module.graph.erase_node(squash)
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return True


def logits_graph(
    module: nn.Module, method: str, kind: str, likelihood: Likelihood, latent_dim: int
) -> tuple[fx.GraphModule | None, str | None]:
    """``method`` with its final sigmoid or softmax skipped (exact logits), or None and why not.

    A softmax's input is taken as the logits only when, on probe latents, its
    normalization over the likelihood's levels gives the probabilities ``method``
    gives (the softmax ran over the levels, in the layout format 1 reads).
    """
    squash = "sigmoid" if kind == BINARY else "softmax"
    try:
        graph_module = trace(module, method)
    except VaeevalError as error:
        return None, f"{error}"
    if not skip_final_squash(graph_module, kind):
        return None, f"{method} does not end in a {squash} vaeeval could skip"
    if kind == CATEGORICAL and not _same_categories(module, method, graph_module, likelihood, latent_dim):
        return None, f"{method}'s final softmax does not run over the {likelihood.levels} levels"
    return graph_module, None


def _same_categories(module: nn.Module, method: str, graph_module: fx.GraphModule, likelihood: Likelihood, latent_dim: int) -> bool:
    """The traced logits, normalized over the levels as format 1 does, give ``method``'s own probabilities."""
    z = rng.standard_normal(1, np.arange(1), 0, 4, latent_dim)[0].float()
    try:
        with torch.inference_mode():
            probs = _flat(getattr(module, method)(z), method).reshape(4, likelihood.params_per_dim, -1)
            logits = _flat(graph_module(z), method).reshape(4, likelihood.params_per_dim, -1)
    except Exception:  # a probe the user's code does not take: keep the clamped fallback
        return False
    return bool(torch.allclose(torch.log_softmax(logits, 1), probs.clamp_min(1e-30).log(), atol=1e-4, rtol=0))


def probabilities_kind(likelihood: Likelihood, decoder_output: str) -> str | None:
    """How the decoder's output must be turned into logits: None, ``binary`` or ``categorical``."""
    if decoder_output not in DECODER_OUTPUTS:
        raise VaeevalError(f"{option('decoder_output')} {decoder_output!r}: choose one of {', '.join(DECODER_OUTPUTS)}")
    if decoder_output not in likelihood.decoder_outputs:
        raise VaeevalError(f"{option('decoder_output')} {decoder_output} does not describe a {likelihood.family} decoder")
    return likelihood.decoder_outputs[decoder_output]


# ---------------------------------------------------------------- the model


def _call(what: str, function: Callable[[], Any]) -> Any:
    with torch.inference_mode():
        return call_user(what, function)


# Decoder outputs declared as logits that all lie in [0, 1] over this many probe draws of z ~ N(0, I)
# are most likely probabilities: the output warns that --decoder-output probs may be forgotten.
_PROBE_DRAWS = 64


def _probe_covariates(covariates: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, torch.Tensor]:
    """Zeros shaped and typed as two points' covariates, to probe ``encode`` and ``decode`` with."""
    return {name: torch.zeros((2, *shape), dtype=covariate_dtype(dtype)) for name, (shape, dtype) in covariates.items()}


def _prior(module: nn.Module, latent_dim: int, posterior: Distribution) -> DistributionPrior | None:
    """The model's ``prior()`` as p(z), checked to be a distribution over one latent vector; None without one."""
    if not callable(getattr(module, "prior", None)):
        return None
    found = _call("prior()", module.prior)
    if not isinstance(found, Distribution):
        raise VaeevalError(f"prior() returned {_describe(found)}; vaeeval needs a torch.distributions.Distribution over z")
    if tuple(found.event_shape) != (latent_dim,) or tuple(found.batch_shape) != ():
        raise VaeevalError(
            f"prior() returned {describe(found)} with batch shape {list(found.batch_shape)} and event shape "
            f"{list(found.event_shape)}; vaeeval needs batch [] and event [{latent_dim}] (encode's latent dimension)"
        )
    return DistributionPrior(found, latent_dim, posterior)


def _logits_warning(decoder: DecoderAdapter, latent_dim: int, covariates: Mapping[str, torch.Tensor], family: str) -> str | None:
    """A note when outputs declared as logits all lie in [0, 1] (``--decoder-output probs`` probably forgotten)."""
    z = rng.standard_normal(0, np.arange(1), 0, _PROBE_DRAWS, latent_dim)[0].float()
    repeated = {name: value[:1].expand(_PROBE_DRAWS, *value.shape[1:]) for name, value in covariates.items()}
    outputs = _call(f"{decoder.method}(z)", lambda: decoder.call(z, repeated))
    if isinstance(outputs, torch.Tensor) and bool(((outputs >= 0) & (outputs <= 1)).all()):
        return (
            f"warning: every {decoder.method}(z) output lies in [0, 1] although --decoder-output says logits: "
            f"if decode ends in a sigmoid or softmax, pass --decoder-output probs (the {family} numbers are wrong "
            "otherwise)"
        )
    return None


def arch_model(
    weights: str | Path,
    options: ArchOptions,
    input_shape: Sequence[int],
    covariates: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> Model:
    """Build a model from a user's class and a safetensors state dict.

    A model whose posterior is a diagonal Normal, whose decoder gives format-1
    parameters, with no ``prior()`` and no covariates, takes the fast format-1 path;
    anything else is an ``ArchModel`` evaluated through its distributions.

    Args:
        weights: the state dict, a safetensors file.
        options: how to find, build and read the user's model.
        input_shape: the shape of one data point.
        covariates: each covariate's shape per point and dtype, by the name ``encode``
            and ``decode`` take it as a keyword argument.

    Raises:
        VaeevalError: anything that stops the model from being built or probed, in one line.
    """
    weights = Path(weights)
    covariates = dict(covariates or {})
    _, tensors = read_safetensors(weights)
    factory = load_architecture(options.spec)
    module = build_module(options.spec, factory, options.args).float().eval()
    spec = dict(options.likelihood or {})
    likelihood_tensor_names = [v for k, v in spec.items() if k != "family" and isinstance(v, str)]
    load_state(module, tensors, weights, options.spec, extra=likelihood_tensor_names)
    for method in (options.encode_method, options.decode_method):
        if not callable(getattr(module, method, None)):
            flag = option("encode_method" if method == options.encode_method else "decode_method")
            raise VaeevalError(f"{option('arch')} {options.spec}: {type(module).__name__} has no method {method!r} (see {flag})")
    input_shape = tuple(int(s) for s in input_shape)
    if options.encode_shape is not None and math.prod(options.encode_shape) != math.prod(input_shape):
        raise VaeevalError(
            f"{option('input_shape')} {list(options.encode_shape)} holds {math.prod(options.encode_shape)} values; "
            f"a data point holds {math.prod(input_shape)}"
        )

    probe = _probe_covariates(covariates)
    encoder = EncoderAdapter(module, options.encode_method, options.encode_shape)
    x = torch.zeros(2, *input_shape)
    posterior = _call(f"{options.encode_method}(x)", lambda: as_posterior(encoder.call(x, probe), options.encode_method, 2))
    latent_dim = int(posterior.event_shape[0])
    prior = _prior(module, latent_dim, posterior)
    z = torch.zeros(2, latent_dim)
    raw = _call(f"{options.decode_method}(z)", lambda: partial(getattr(module, options.decode_method), **probe)(z))
    notes: list[str] = []
    if isinstance(raw, Distribution):
        if options.likelihood:
            raise VaeevalError(
                f"{option('likelihood')}: {options.decode_method}(z) returns {describe(raw)}, which is the "
                f"likelihood itself; leave {option('likelihood')} out"
            )
        likelihood: Likelihood = DistributionLikelihood(raw, input_shape, options.decode_method)
        decoder = DecoderAdapter(module, options.decode_method, None, None)
        how = f"{options.decode_method}(z) returns {likelihood.spec['distribution']}, whose log_prob is log p(x|z)"
    else:
        if not options.likelihood:
            raise VaeevalError(
                f"{options.decode_method}(z) returns {_describe(raw)}: say which distribution it parameterizes with "
                f"{option('likelihood')} (or return a torch.distributions object from it)"
            )
        float_tensors = {name: t.float() for name, t in tensors.items() if t.is_floating_point()}
        try:
            likelihood = likelihood_from_spec(spec, float_tensors, input_shape)
        except ValueError as error:
            raise VaeevalError(f"{option('likelihood')}: {error}") from None
        kind = probabilities_kind(likelihood, options.decoder_output)
        traced, untraced = logits_graph(module, options.decode_method, kind, likelihood, latent_dim) if kind else (None, None)
        decoder = DecoderAdapter(module, options.decode_method, kind, traced, untraced, likelihood.params_per_dim)
        decoded = _call(f"{options.decode_method}(z)", lambda: decoder.call(z, probe))
        _check_parameters(decoded, likelihood, options.decode_method, input_shape)
        if kind is None and options.decoder_output == "logits" and likelihood.decoder_outputs.get("probs"):
            warning = _logits_warning(decoder, latent_dim, probe, likelihood.family)
            if warning:
                notes.append(warning)
        how = _decoder_how(kind, traced, untraced, options.decoder_output)

    general = not diagonal(posterior) or prior is not None or isinstance(raw, Distribution) or bool(covariates)
    if prior is None:
        notes.insert(0, ASSUMED)
        prior = standard_normal(latent_dim, posterior) if general else prior_from_spec(None, {}, latent_dim)
        prior.spec["source"] = ASSUMED  # in words in the notes, and in JSON here
    fields = {
        "encoder": encoder,
        "decoder": decoder,
        "likelihood": likelihood,
        "prior": prior,
        "input_shape": input_shape,
        "latent_dim": latent_dim,
        "description": f"--arch {options.spec} ({type(module).__name__}); decoder: {how}",
        "path": weights,
        "digest": file_digest(weights),
        "arch": options.spec,
        "extra_parameters": sum(p.numel() for p in module.parameters()),
        "decoder_width": max((p.shape[0] for p in module.parameters() if p.dim() > 0), default=0),
        "notes": tuple(notes),
    }
    if not general:
        return Model(**fields)
    return ArchModel(
        **fields,
        general=True,
        posterior_of=lambda x, c: as_posterior(encoder.call(x, c), options.encode_method, x.shape[0]),
        decode_of=decoder.call,
        covariates=tuple(covariates),
    )


def _check_parameters(decoded: torch.Tensor, likelihood: Likelihood, method: str, input_shape: tuple[int, ...]) -> None:
    """``decode``'s parameters are as many per point as the likelihood needs; a missing scale is named."""
    dims = math.prod(input_shape)
    needed = likelihood.params_per_dim * dims
    if decoded.shape[1] == needed:
        return
    message = (
        f"{method}(z) gives {decoded.shape[1]} values per point; the {likelihood.family} likelihood needs "
        f"P x D = {likelihood.params_per_dim} x {dims} = {needed}"
    )
    if likelihood.scale_keys and likelihood.params_per_dim == 2 and decoded.shape[1] == dims:
        message += (
            f" (a location, then a log-scale, per dimension): for a fixed scale pass {option('sigma')}, for a learned "
            f"one kept in the state dict {option('log_sigma_tensor')}"
        )
    raise VaeevalError(message)


def _decoder_how(kind: str | None, traced: nn.Module | None, untraced: str | None, decoder_output: str) -> str:
    """How the decoder's output was read, as the model's description says it."""
    if kind is None:
        return f"{decoder_output} outputs"
    squash = "sigmoid" if kind == BINARY else "softmax"
    if traced is not None:
        return f"logits read before its final {squash}"
    return f"probabilities clamped to [eps, 1 - eps] ({untraced})"
