"""A user's encode and decode as modules (``EncoderAdapter``, ``DecoderAdapter``), traced with torch.fx
where format 1 needs their layers, and the final sigmoid or softmax of a decoder that returns probabilities."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from types import FunctionType
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.distributions import Bernoulli, Distribution, Independent, Normal, OneHotCategorical
from torch.distributions.utils import probs_to_logits

from vaeeval.core import rng
from vaeeval.errors import VaeevalError, option
from vaeeval.format.likelihoods import BINARY, CATEGORICAL, Likelihood
from vaeeval.user.calls import USER_FAILURES, call_user, first_line, where

DECODER_OUTPUTS = ("logits", "probs", "mean")  # what a decoder may return: --decoder-output
_SHAPE_ONLY = {"view", "reshape", "flatten", "unflatten", "contiguous", "squeeze", "unsqueeze"}


def describe_value(value: Any) -> str:
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
        self.width: int | None = None  # the latent width its first call gave, which every later call must give

    def call(self, x: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> Any:
        """What ``encode(x, **covariates)`` returns, ``x`` reshaped as ``encode`` takes it.

        Raises:
            VaeevalError: a latent width other than its first call's.
        """
        if self.encode_shape is not None:
            x = x.reshape(x.shape[0], *self.encode_shape)
        output = call_user(f"{self.method}(x)", partial(getattr(self.module, self.method), **(covariates or {})), x)
        width = _latent_width(output)
        if self.width is None:
            self.width = width
        elif width is not None and width != self.width:
            raise VaeevalError(
                f"{self.method}(x) returned latent vectors of width {width}; its first call gave "
                f"width {self.width}: the latent width must not change from one call to the next"
            )
        return output

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
                f"{self.method}(x) returned {describe_value(output)}; vaeeval needs (mean, log_var) or a "
                "torch.distributions.Normal"
            )
        rows = x.shape[0]
        if mean.shape != log_var.shape or mean.dim() != 2 or mean.shape[0] != rows:
            raise VaeevalError(
                f"{self.method}(x) returned a mean of {list(mean.shape)} and a log-variance of {list(log_var.shape)} "
                f"for {rows} points; both must be [{rows}, latent_dim]"
            )
        return torch.cat([mean, log_var], dim=1)


def _latent_width(output: Any) -> int | None:
    """The last axis of what ``encode`` returned (a mean, or a distribution's batch and event), if it has one."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) and output[0].dim():
        return int(output[0].shape[-1])
    if isinstance(output, Distribution):
        shape = (*output.batch_shape, *output.event_shape)
        return int(shape[-1]) if len(shape) > 1 else None
    return None


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
            f"{method}(z) returned {describe_value(output)}; vaeeval needs a tensor of the likelihood's parameters "
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


DISCRETE_HEADS = {OneHotCategorical: "categorical", Bernoulli: "bernoulli"}  # format 1's discrete latents, by torch class


@contextmanager
def discrete_latent_as_logits(module: nn.Module) -> Iterator[list[str]]:
    """While ``encode`` is traced: ``OneHotCategorical(logits=...)``, ``Bernoulli(logits=...)`` and ``Independent``,
    as the user's module and ``torch.distributions`` name them, stand for the logits they are built from, so the
    traced graph ends in the logits format 1's encoder gives. The list receives the family each one built."""
    built: list[str] = []

    def head(cls: type, family: str) -> Any:
        def stand_in(*args: Any, logits: Any = None, **kwargs: Any) -> Any:
            if logits is None:
                raise TypeError(f"{cls.__name__}(...) without logits=: format 1 builds a discrete latent from its logits")
            built.append(family)
            return logits

        return stand_in

    stand_ins: dict[type, Any] = {cls: head(cls, family) for cls, family in DISCRETE_HEADS.items()}
    stand_ins[Independent] = lambda base, *args, **kwargs: base
    namespaces = {id(vars(torch.distributions)): vars(torch.distributions)}
    for cls in type(module).__mro__:  # the globals of the user's code (its file is not in sys.modules)
        for function in vars(cls).values():
            if isinstance(function, FunctionType) and not function.__module__.startswith("torch."):
                namespaces[id(function.__globals__)] = function.__globals__
    replaced = []
    for namespace in namespaces.values():
        for name, value in list(namespace.items()):
            if isinstance(value, type) and value in stand_ins:
                replaced.append((namespace, name, value))
                namespace[name] = stand_ins[value]
    try:
        yield built
    finally:
        for namespace, name, value in replaced:
            namespace[name] = value


def trace(module: nn.Module, method: str) -> fx.GraphModule:
    """``module.method`` traced by torch.fx.

    Raises:
        VaeevalError: it cannot be traced; the message names the file, line and expression where tracing stopped.
    """
    root = MethodModule(module, method)
    try:
        graph = _Tracer().trace(root)
    except USER_FAILURES as error:  # whatever the user's code does under tracing
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
