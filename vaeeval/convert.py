"""Turn a user's model (``--arch``) into a self-contained format-1 file, verified number for number.

``encode`` and ``decode`` are traced with torch.fx and read as chains of
format-1 layers: modules (Linear, Conv2d, ConvTranspose2d, activations,
Flatten, Unflatten; Dropout and Identity are dropped), the functional forms of
the activations, and reshapes. Two linear heads on the same input (the
``fc21``/``fc22`` of the pytorch/examples VAE) become one linear layer; a final
sigmoid of a decoder that gives probabilities is dropped, since format 1 takes
logits. Anything else is refused, naming the operation. The file is then
evaluated beside the original on the same data and seed, and kept only if every
number agrees to float32 rounding (``AGREEMENT``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from vaeeval.arch import DecoderAdapter, EncoderAdapter, final_sigmoid, trace
from vaeeval.errors import VaeevalError, option
from vaeeval.evaluate import evaluate
from vaeeval.files import staged, writing
from vaeeval.layers import Reshape, function_layer, is_layer_module, method_layer
from vaeeval.likelihoods import BINARY, CATEGORICAL
from vaeeval.model import Model, save_model
from vaeeval.results import METRICS

_RESHAPES = {"view", "reshape"}


def _refuse(method: str, node: fx.Node, why: str = "format 1 has no such layer") -> VaeevalError:
    target = getattr(node.target, "__name__", node.target)
    return VaeevalError(f"{method}: {node.op} {target!s} ({node.format_node()}) cannot be expressed in format 1: {why}")


def _reshape_layer(method: str, node: fx.Node) -> nn.Module:
    """``x.view(-1, 784)``, ``x.view(x.size(0), -1)``, ``x.view(-1, 1, 28, 28)`` -> flatten / unflatten."""
    shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    batch, rest = shape[0], shape[1:]
    if not (batch == -1 or isinstance(batch, fx.Node)) or not all(isinstance(s, int) for s in rest):
        raise _refuse(method, node, "only reshapes that keep the batch axis first are layers")
    if len(rest) == 1:
        return nn.Flatten()
    if -1 in rest:
        raise _refuse(method, node, "give the unflattened shape in full")
    return Reshape(tuple(rest))


def _layer(graph_module: fx.GraphModule, method: str, node: fx.Node) -> nn.Module | None:
    """The format-1-expressible module a node computes (None for a no-op)."""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if not is_layer_module(module):
            raise _refuse(method, node, f"{type(module).__name__} is not a format-1 layer")
        return module
    if node.op == "call_method" and node.target == "contiguous":
        return None
    if node.op == "call_method" and node.target in _RESHAPES:
        return _reshape_layer(method, node)
    layer = None
    if node.op == "call_function":
        layer = function_layer(node.target, node.args[1:], node.kwargs)
    elif node.op == "call_method":
        layer = method_layer(node.target, node.args[1:])
    if layer is None:
        raise _refuse(method, node)
    return layer


def _chain(graph_module: fx.GraphModule, method: str, end: fx.Node) -> list[nn.Module]:
    """The layers from the input to ``end``, which must be a simple chain."""
    layers: list[nn.Module] = []
    node = end
    while node.op != "placeholder":
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node):
            raise _refuse(method, node, "its first input is not the previous layer")
        others = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(a, fx.Node)]
        if any(not (o.op == "call_method" and o.target == "size") for o in others):
            raise _refuse(method, node, "it combines two tensors; format 1 layers form one chain")
        layer = _layer(graph_module, method, node)
        if layer is not None:
            layers.append(layer)
        node = source
    return layers[::-1]


def _fused_heads(graph_module: fx.GraphModule, method: str, heads: tuple[Any, ...]) -> tuple[fx.Node, nn.Linear]:
    """Two linear layers on the same input, as one linear layer giving both outputs one after the other."""
    modules = [graph_module.get_submodule(h.target) if isinstance(h, fx.Node) and h.op == "call_module" else None for h in heads]
    if not all(isinstance(m, nn.Linear) for m in modules) or heads[0].args[0] is not heads[1].args[0]:
        shown = ", ".join(h.format_node() if isinstance(h, fx.Node) else repr(h) for h in heads)
        raise VaeevalError(
            f"{method}: returns {len(heads)} outputs ({shown}) that are not linear heads on one input; "
            "format 1 takes one chain"
        )
    first, second = modules
    fused = nn.Linear(first.in_features, first.out_features + second.out_features)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([first.weight, second.weight]))
        bias = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules]
        fused.bias.copy_(torch.cat(bias))
    return heads[0].args[0], fused


def to_sequential(module: nn.Module, method: str, *, drop_final_sigmoid: bool = False) -> nn.Sequential:
    """``module.method`` as an ``nn.Sequential`` of format-1 layers.

    Raises:
        VaeevalError: the method cannot be traced, or computes something format 1 cannot express.
    """
    try:
        graph_module = trace(module, method)
    except Exception as error:
        raise VaeevalError(f"{method} cannot be traced into layers: {str(error).splitlines()[0]}") from None
    graph = graph_module.graph
    if drop_final_sigmoid:
        sigmoid = final_sigmoid(graph)
        if sigmoid is None:
            raise VaeevalError(f"{method}: gives probabilities, but not from a final sigmoid format 1 could drop")
        sigmoid.replace_all_uses_with(sigmoid.args[0])
        graph.erase_node(sigmoid)
    (output,) = [n for n in graph.nodes if n.op == "output"]
    result = output.args[0]
    if isinstance(result, (tuple, list)) and len(result) == 2:
        if all(isinstance(r, fx.Node) and r.op == "call_function" and r.target is operator.getitem for r in result):
            source = result[0].args[0]
            if source is result[1].args[0] and source.op == "call_method" and source.target == "chunk":
                return nn.Sequential(*_chain(graph_module, method, source.args[0]))
        trunk, fused = _fused_heads(graph_module, method, tuple(result))
        return nn.Sequential(*_chain(graph_module, method, trunk), fused)
    if not isinstance(result, fx.Node):
        raise VaeevalError(f"{method}: returns {type(result).__name__}, not a tensor format 1 can express")
    return nn.Sequential(*_chain(graph_module, method, result))


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` wrote and how it was checked."""

    path: Path
    model: Model
    points: int
    samples: int
    seed: int
    largest_difference: float  # nats, over every point and number


# The same layers computed by differently shaped matrix products (two linear heads,
# or one fused) round differently in float32; numbers must agree to this relative
# precision (per nat above 1), which is far below any Monte Carlo error.
AGREEMENT = 1e-5


def verification_data(model: Model, points: int = 64, seed: int = 0) -> np.ndarray:
    """Points in the likelihood's support, when the user gives no data to verify on."""
    return model.likelihood.verification_points(np.random.default_rng(seed), (points, *model.input_shape))


def convert(
    source: Model,
    out: str | Path,
    *,
    data: np.ndarray | None = None,
    samples: int = 64,
    seed: int = 0,
) -> Conversion:
    """Write ``source`` (built by ``arch_model``) as a format-1 file and verify it.

    Args:
        source: a model whose encoder and decoder are the ``--arch`` adapters.
        out: the format-1 file to write.
        data: points to verify on (default: 64 points drawn from the likelihood's support).
        samples, seed: the evaluation both models get.

    Raises:
        VaeevalError: a part that format 1 cannot express (named), or numbers that differ.
    """
    out = Path(out)
    encoder, decoder = source.encoder, source.decoder
    if not isinstance(encoder, EncoderAdapter) or not isinstance(decoder, DecoderAdapter):
        raise VaeevalError(f"convert takes a model built with {option('arch')}")
    if encoder.encode_shape is not None:
        raise VaeevalError(
            f"convert: {option('input_shape')} reshapes inside vaeeval; give the data in the shape encode takes"
        )
    if decoder.probabilities == CATEGORICAL:
        raise VaeevalError(f"{decoder.method}: gives categorical probabilities; format 1 needs the logits before the softmax")
    encoder_layers = to_sequential(encoder.module, encoder.method)
    decoder_layers = to_sequential(decoder.module, decoder.method, drop_final_sigmoid=decoder.probabilities == BINARY)
    likelihood = {**source.likelihood.spec, **source.likelihood.values}
    points = verification_data(source) if data is None else np.asarray(data[:64], dtype=np.float32)
    with writing(out, "model"), staged(out) as temporary:  # out appears only once every number agreed
        saved = save_model(
            temporary,
            encoder_layers,
            decoder_layers,
            likelihood=likelihood,
            input_shape=list(source.input_shape),
            latent_dim=source.latent_dim,
            description=f"converted from {source.path.name} with {source.description}",
        )
        largest = _largest_difference(source, saved, points, samples, seed, out)
    return Conversion(out, replace(saved, path=out), len(points), samples, seed, largest)


def _largest_difference(source: Model, saved: Model, points: np.ndarray, samples: int, seed: int, out: Path) -> float:
    """The largest difference between the two models' numbers, refused beyond float32 rounding."""
    original = evaluate(source, points, samples=samples, seed=seed)
    converted = evaluate(saved, points, samples=samples, seed=seed)
    largest = 0.0
    for name in METRICS:
        a, b = getattr(original.points, name), getattr(converted.points, name)
        gap = np.abs(a - b)
        worst = int(np.argmax(gap - AGREEMENT * np.maximum(1.0, np.abs(a))))
        if gap[worst] > AGREEMENT * max(1.0, abs(a[worst])):
            raise VaeevalError(
                f"the converted model's {name} differs from the original's by {gap[worst]:.3g} nats at point "
                f"{worst} (more than float32 rounding); {out} not written"
            )
        largest = max(largest, float(gap.max()))
    return largest
