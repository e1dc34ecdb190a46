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
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.distributions import Bernoulli, Categorical, Independent, MixtureSameFamily, Normal, OneHotCategorical

from vaeeval.errors import VaeevalError, listing, option
from vaeeval.estimators.importance.evaluate import evaluate
from vaeeval.format.layers import Reshape, function_layer, is_layer_module, method_layer
from vaeeval.format.likelihoods import BINARY
from vaeeval.format.model import Model
from vaeeval.format.saving import save_model
from vaeeval.io.files import staged, writing
from vaeeval.results.numbers import METRICS
from vaeeval.user.distributions import describe
from vaeeval.user.format_latents import through_distributions
from vaeeval.user.methods import DecoderAdapter, EncoderAdapter, discrete_latent_as_logits, skip_final_squash, trace
from vaeeval.user.protocol import ASSUMED, ArchModel, DistributionLikelihood, DistributionPrior, diagonal

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


def to_sequential(module: nn.Module, method: str, *, drop_final: str | None = None) -> nn.Sequential:
    """``module.method`` as an ``nn.Sequential`` of format-1 layers.

    Args:
        drop_final: ``binary`` or ``categorical``: the method gives probabilities, from a
            final sigmoid or softmax (function, method or module) that format 1 drops.

    Raises:
        VaeevalError: the method cannot be traced (naming where), or computes something format 1 cannot express.
    """
    graph_module = trace(module, method)
    graph = graph_module.graph
    if drop_final is not None and not skip_final_squash(graph_module, drop_final):
        squash = "sigmoid" if drop_final == BINARY else "softmax"
        raise VaeevalError(f"{method}: gives probabilities, but not from a final {squash} format 1 could drop")
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
    if result.op == "call_method" and result.target == "chunk" and _chunks(result) == 2:  # ``return h.chunk(2, dim=-1)``
        return nn.Sequential(*_chain(graph_module, method, result.args[0]))
    return nn.Sequential(*_chain(graph_module, method, result))


def _chunks(node: fx.Node) -> Any:
    """How many pieces a ``chunk`` node cuts, when it cuts the last axis."""
    chunks = node.args[1] if len(node.args) > 1 else node.kwargs.get("chunks")
    axis = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return chunks if axis in (-1, 1) else None


@dataclass(frozen=True)
class Conversion:
    """What ``convert`` wrote and how it was checked."""

    path: Path
    model: Model
    points: int
    samples: int
    seed: int
    largest_difference: float  # nats, over every point and number
    unused: tuple[str, ...] = ()  # state-dict tensors left out (allowed with allow_unused)


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
    allow_unused: bool = False,
) -> Conversion:
    """Write ``source`` (built by ``arch_model``) as a format-1 file and verify it.

    A ``prior()`` that is a diagonal Gaussian, or a mixture of them (a VampPrior is one:
    the encoder's posteriors on its pseudo-inputs), is written as a ``gaussian`` or
    ``mixture_of_gaussians`` prior with its values. Anything format 1 cannot hold is
    refused, naming it: a posterior that is not a diagonal Normal, a decoder returning a
    distribution, covariates, another prior; so are state-dict tensors the file would
    leave behind, unless ``allow_unused``.

    Args:
        source: a model whose encoder and decoder are the ``--arch`` adapters.
        out: the format-1 file to write.
        data: points to verify on (default: 64 points drawn from the likelihood's support).
        samples, seed: the evaluation both models get.
        allow_unused: write the file even when state-dict tensors go unused.

    Raises:
        VaeevalError: a part that format 1 cannot express (named), unused tensors, or numbers that differ.
    """
    out = Path(out)
    encoder, decoder = source.encoder, source.decoder
    if not isinstance(encoder, EncoderAdapter) or not isinstance(decoder, DecoderAdapter):
        raise VaeevalError(f"convert takes a model built with {option('arch')}")
    _expressible(source)
    prior = prior_spec(source)
    if encoder.encode_shape is not None:
        raise VaeevalError(
            f"convert: {option('input_shape')} reshapes inside vaeeval; give the data in the shape encode takes"
        )
    if decoder.probabilities is not None and decoder.logits_graph is None:
        squash = "sigmoid" if decoder.probabilities == BINARY else "softmax over the levels"
        raise VaeevalError(
            f"{decoder.method}: gives probabilities, which format 1 reads only from a final {squash} it can drop: {decoder.untraced}"
        )
    discrete = discrete_family(source.posterior(torch.zeros(2, *source.input_shape))) if isinstance(source, ArchModel) else None
    with discrete_latent_as_logits(encoder.module) if discrete else nullcontext():
        encoder_graph = trace(encoder.module, encoder.method)
        encoder_layers = to_sequential(encoder.module, encoder.method)
    decoder_graph = trace(decoder.module, decoder.method)
    decoder_layers = to_sequential(decoder.module, decoder.method, drop_final=decoder.probabilities)
    unused = unused_tensors(source, (encoder_graph, decoder_graph))
    if unused and not allow_unused:
        raise VaeevalError(
            f"{source.path}: the format-1 file would leave out {listing(unused, 6, counted=True)} of the state dict "
            f"(used by no part of the model it can hold); pass {option('allow_unused')} to write it anyway"
        )
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
            prior=prior,
            posterior=None if discrete is None else {"family": discrete},
            description=f"converted from {source.path.name} with {source.description}",
        )
        saved = through_distributions(saved)
        largest = _largest_difference(source, saved, points, samples, seed, out)
    return Conversion(out, replace(saved, path=out), len(points), samples, seed, largest, tuple(unused))


def _expressible(source: Model) -> None:
    """Refuse, naming it, a part of an ``--arch`` model that format 1 cannot hold (evaluate it with --arch instead)."""
    instead = f"evaluate it with {option('arch')} instead"
    reason = getattr(source.encoder.module, "not_convertible", None)  # a module that knows format 1 cannot hold it
    if isinstance(reason, str):
        raise VaeevalError(f"convert: {reason}")
    if getattr(source, "covariates", ()):
        raise VaeevalError(f"convert: the model takes covariates ({', '.join(source.covariates)}), which format 1 cannot hold; {instead}")
    if isinstance(source.likelihood, DistributionLikelihood):
        raise VaeevalError(
            f"convert: {source.decoder.method}(z) returns {source.likelihood.spec['distribution']}; format 1 holds a decoder "
            f"giving the likelihood's parameters (convert a method returning them, with {option('decode_method')} and "
            f"{option('likelihood')}), or {instead}"
        )
    if isinstance(source, ArchModel):
        probe = source.posterior(torch.zeros(2, *source.input_shape))
        if not diagonal(probe) and discrete_family(probe) is None:
            raise VaeevalError(
                f"convert: {source.encoder.method}(x) returns {describe(probe)}; format 1's q(z|x) is a diagonal "
                f"Normal, a OneHotCategorical or an Independent(Bernoulli) from logits; {instead}"
            )


def discrete_family(posterior: Any) -> str | None:
    """Format 1's family of a discrete q(z|x) (``OneHotCategorical``, ``Independent(Bernoulli, 1)``), else None."""
    if isinstance(posterior, Independent) and posterior.reinterpreted_batch_ndims == 1:
        posterior = posterior.base_dist
        return "bernoulli" if type(posterior) is Bernoulli else None
    return "categorical" if type(posterior) is OneHotCategorical else None


def prior_spec(source: Model) -> dict[str, Any] | None:
    """The format-1 prior block of a model's ``prior()``, its tensors as values; None for the standard normal.

    Raises:
        VaeevalError: a prior format 1 cannot hold.
    """
    prior = source.prior
    if not isinstance(prior, DistributionPrior) or prior.spec.get("source") == ASSUMED:
        return None
    found = prior.prior
    if isinstance(found, Independent) and isinstance(found.base_dist, Normal) and found.reinterpreted_batch_ndims == 1:
        base = found.base_dist
        return {"family": "gaussian", "mean": base.loc.float(), "log_var": 2 * base.scale.float().log()}
    family = discrete_family(found)
    if family is not None:  # a discrete latent's prior, from its logits
        base = found.base_dist if isinstance(found, Independent) else found
        return {"family": family, "logits": base.logits.float()}
    if isinstance(found, MixtureSameFamily) and isinstance(found.mixture_distribution, Categorical):
        components = found.component_distribution
        if isinstance(components, Independent) and isinstance(components.base_dist, Normal):
            base = components.base_dist
            logits = found.mixture_distribution.logits
            return {"family": "mixture_of_gaussians", "logits": logits.float(), "means": base.loc.float(),
                    "log_vars": 2 * base.scale.float().log()}
    raise VaeevalError(
        f"convert: prior() returns {describe(found)}; format 1 holds a diagonal Gaussian or a mixture of them; "
        f"evaluate it with {option('arch')} instead"
    )


def unused_tensors(source: Model, graphs: tuple[fx.GraphModule, ...]) -> list[str]:
    """State-dict tensors no part of the format-1 file comes from: not in the traced encode or decode,
    not behind ``prior()`` (found through autograd), not the likelihood's."""
    module = source.encoder.module
    used: set[str] = set(source.likelihood.tensors)
    for graph_module in graphs:
        for node in graph_module.graph.nodes:
            if node.op == "call_module":
                prefix = str(node.target).removeprefix("module.")
                owner = graph_module.get_submodule(node.target)
                used.update(f"{prefix}.{name}" for name, _ in owner.state_dict().items())
            elif node.op == "get_attr":
                used.add(str(node.target).removeprefix("module."))
    if isinstance(source.prior, DistributionPrior) and callable(getattr(module, "prior", None)):
        used.update(_behind_prior(module))
    return [name for name in module.state_dict() if name not in used]


def _behind_prior(module: nn.Module) -> set[str]:
    """The parameters ``prior()`` computes from: those its distribution's tensors have a gradient in."""
    parameters = dict(module.named_parameters())
    with torch.enable_grad():
        found = module.prior()
        tensors = [t for t in _tensors_of(found) if t.requires_grad]
        if not tensors:
            return set()
        grads = torch.autograd.grad(sum(t.float().sum() for t in tensors), list(parameters.values()), allow_unused=True)
    return {name for name, grad in zip(parameters, grads, strict=True) if grad is not None}


def _tensors_of(distribution: Any) -> list[torch.Tensor]:
    found = []
    for value in vars(distribution).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, torch.distributions.Distribution):
            found.extend(_tensors_of(value))
    return found


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
