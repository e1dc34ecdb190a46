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
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.distributions import Independent, Normal
from torch.distributions.utils import probs_to_logits

from vaeeval.errors import VaeevalError, listing, option
from vaeeval.files import file_digest
from vaeeval.likelihoods import BINARY, Likelihood, likelihood_from_spec
from vaeeval.model import Model, read_safetensors
from vaeeval.priors import prior_from_spec

ENTRY_POINT_GROUP = "vaeeval.architectures"
DECODER_OUTPUTS = ("logits", "probs", "mean")
_SHAPE_ONLY = {"view", "reshape", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze"}


@dataclass(frozen=True)
class ArchOptions:
    """How to read a user's model through the protocol.

    Attributes:
        spec: ``file.py:Attr``, ``package.module:attr`` or a registered name.
        args: keyword arguments for the class or factory.
        likelihood: a format-1 likelihood block; tensor names refer to the weights file.
        decoder_output: ``logits`` (the family's format-1 parameters), ``probs``
            (probabilities) or ``mean`` (the distribution's mean).
        encode_method, decode_method: the methods to call.
        encode_shape: the shape ``encode`` takes per point, when it differs from the data's.
    """

    spec: str
    likelihood: Mapping[str, Any]
    args: Mapping[str, Any] = field(default_factory=dict)
    decoder_output: str = "logits"
    encode_method: str = "encode"
    decode_method: str = "decode"
    encode_shape: tuple[int, ...] | None = None


def registered_architectures() -> dict[str, importlib.metadata.EntryPoint]:
    """Names registered by installed packages under the ``vaeeval.architectures`` entry-point group."""
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _where(error: BaseException) -> str:
    """`` at file.py:12 (expression)``: the last frame of the traceback outside vaeeval and torch, if any."""
    frames = traceback.extract_tb(error.__traceback__)
    ours = str(Path(__file__).parent)
    for frame in reversed(frames):
        if not frame.filename.startswith(ours) and "/torch/" not in frame.filename and "<" not in frame.filename[:1]:
            code = f" ({frame.line.strip()})" if frame.line else ""
            return f" at {frame.filename}:{frame.lineno}{code}"
    return ""


def call_user(what: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``: the user's code; whatever it raises becomes one ``VaeevalError`` naming the call,
    the exception, and the file and line it came from."""
    try:
        return function(*args)
    except VaeevalError:
        raise
    except Exception as error:  # the user's code: any failure is reported, in one line
        raise VaeevalError(f"{what} raised {_first_line(error)}{_where(error)}") from None


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
        raise VaeevalError(f"{option('arch')} {spec}: running {path} raised {_first_line(error)}{_where(error)}") from None
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(path.resolve().parent))
    return module


def _import_module(spec: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as error:
        raise VaeevalError(f"{option('arch')} {spec}: importing {name} raised {_first_line(error)}") from None


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
            raise VaeevalError(f"{option('arch')} {spec}: loading its entry point raised {_first_line(error)}") from None
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
            raise VaeevalError(f"{option('arch')} {spec}: {spec.rpartition(':')[2]}({shown}) raised {_first_line(error)}") from None
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encode_shape is not None:
            x = x.reshape(x.shape[0], *self.encode_shape)
        output = call_user(f"{self.method}(x)", getattr(self.module, self.method), x)
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
    ) -> None:
        super().__init__()
        self.module, self.method = module, method
        self.probabilities = probabilities  # None, "binary" or "categorical": how to turn probs into logits
        self.logits_graph = logits_graph  # decode with its final sigmoid skipped, when it could be traced

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.logits_graph is not None:
            return _rows(_flat(call_user(f"{self.method}(z)", self.logits_graph, z), self.method), z.shape[0], self.method)
        output = _rows(_flat(call_user(f"{self.method}(z)", getattr(self.module, self.method), z), self.method), z.shape[0], self.method)
        if self.probabilities is None:
            return output
        outside = ~((output >= 0) & (output <= 1))
        if outside.any():
            raise VaeevalError(
                f"{self.method}(z) gave {output[outside][0].item():.6g}, outside [0, 1], but "
                f"{option('decoder_output')} says probabilities"
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


def trace(module: nn.Module, method: str) -> fx.GraphModule:
    """``module.method`` traced by torch.fx (raises whatever tracing raises)."""
    return fx.symbolic_trace(MethodModule(module, method))


def is_sigmoid(node: fx.Node) -> bool:
    """A node computing an elementwise logistic sigmoid."""
    return (node.op == "call_function" and node.target in (torch.sigmoid, torch.nn.functional.sigmoid)) or (
        node.op == "call_method" and node.target == "sigmoid"
    )


def final_sigmoid(graph: fx.Graph) -> fx.Node | None:
    """The sigmoid the output comes from, through reshapes only, if any."""
    (output,) = [n for n in graph.nodes if n.op == "output"]
    node = output.args[0]
    while isinstance(node, fx.Node):
        if is_sigmoid(node):
            return node if len(node.users) == 1 else None
        if node.op == "call_method" and node.target in _SHAPE_ONLY or (
            node.op == "call_function" and node.target in (torch.flatten, torch.reshape)
        ):
            node = node.args[0]
            continue
        return None
    return None


def logits_graph(module: nn.Module, method: str) -> fx.GraphModule | None:
    """``method`` with its final sigmoid skipped (exact logits), or None when it cannot be traced so."""
    try:
        graph_module = trace(module, method)
    except Exception:  # tracing the user's code is best effort; the caller falls back
        return None
    sigmoid = final_sigmoid(graph_module.graph)
    if sigmoid is None:
        return None
    sigmoid.replace_all_uses_with(sigmoid.args[0])
    graph_module.graph.erase_node(sigmoid)
    graph_module.recompile()
    return graph_module


def probabilities_kind(likelihood: Likelihood, decoder_output: str) -> str | None:
    """How the decoder's output must be turned into logits: None, ``binary`` or ``categorical``."""
    if decoder_output not in DECODER_OUTPUTS:
        raise VaeevalError(f"{option('decoder_output')} {decoder_output!r}: choose one of {', '.join(DECODER_OUTPUTS)}")
    if decoder_output not in likelihood.decoder_outputs:
        raise VaeevalError(f"{option('decoder_output')} {decoder_output} does not describe a {likelihood.family} decoder")
    return likelihood.decoder_outputs[decoder_output]


# ---------------------------------------------------------------- the model


def _call(what: str, function: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return call_user(what, function)


def arch_model(weights: str | Path, options: ArchOptions, input_shape: Sequence[int]) -> Model:
    """Build a ``Model`` from a user's class and a safetensors state dict.

    Args:
        weights: the state dict, a safetensors file.
        options: how to find, build and read the user's model.
        input_shape: the shape of one data point.

    Raises:
        VaeevalError: anything that stops the model from being built or probed, in one line.
    """
    weights = Path(weights)
    _, tensors = read_safetensors(weights)
    factory = load_architecture(options.spec)
    module = build_module(options.spec, factory, options.args).float().eval()
    likelihood_tensor_names = [v for k, v in options.likelihood.items() if k != "family" and isinstance(v, str)]
    load_state(module, tensors, weights, options.spec, extra=likelihood_tensor_names)
    for method in (options.encode_method, options.decode_method):
        if not callable(getattr(module, method, None)):
            flag = option("encode_method" if method == options.encode_method else "decode_method")
            raise VaeevalError(f"{option('arch')} {options.spec}: {type(module).__name__} has no method {method!r} (see {flag})")

    input_shape = tuple(int(s) for s in input_shape)
    float_tensors = {name: t.float() for name, t in tensors.items() if t.is_floating_point()}
    try:
        likelihood: Likelihood = likelihood_from_spec(options.likelihood, float_tensors, input_shape)
    except ValueError as error:
        raise VaeevalError(f"{option('likelihood')}: {error}") from None
    kind = probabilities_kind(likelihood, options.decoder_output)
    traced = logits_graph(module, options.decode_method) if kind == BINARY else None
    encoder = EncoderAdapter(module, options.encode_method, options.encode_shape)
    decoder = DecoderAdapter(module, options.decode_method, kind, traced)

    if options.encode_shape is not None and math.prod(options.encode_shape) != math.prod(input_shape):
        raise VaeevalError(
            f"{option('input_shape')} {list(options.encode_shape)} holds {math.prod(options.encode_shape)} values; "
            f"a data point holds {math.prod(input_shape)}"
        )
    encoded = _call(f"{options.encode_method}(x)", lambda: encoder(torch.zeros(2, *input_shape)))
    latent_dim = encoded.shape[1] // 2
    decoded = _call(f"{options.decode_method}(z)", lambda: decoder(torch.zeros(2, latent_dim)))
    needed = likelihood.params_per_dim * math.prod(input_shape)
    if decoded.shape[1] != needed:
        raise VaeevalError(
            f"{options.decode_method}(z) gives {decoded.shape[1]} values per point; the {likelihood.family} "
            f"likelihood needs P x D = {likelihood.params_per_dim} x {math.prod(input_shape)} = {needed}"
        )
    if kind == BINARY:
        how = "logits read before its final sigmoid" if traced is not None else (
            "probabilities clamped to [eps, 1 - eps] (decode could not be traced to its logits)"
        )
    else:
        how = f"{options.decoder_output} outputs"
    return Model(
        encoder=encoder,
        decoder=decoder,
        likelihood=likelihood,
        prior=prior_from_spec(None, {}, latent_dim),
        input_shape=input_shape,
        latent_dim=latent_dim,
        description=f"--arch {options.spec} ({type(module).__name__}); decoder: {how}",
        path=weights,
        digest=file_digest(weights),
        arch=options.spec,
        extra_parameters=sum(p.numel() for p in module.parameters()),
        decoder_width=max((p.shape[0] for p in module.parameters() if p.dim() > 0), default=0),
    )
