"""The layer registry of format 1: a LayerType per layer type, building a layer from its spec, and finding the spec of a torch module."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vaeeval.errors import SpecError, VaeevalError
from vaeeval.format.specs import named_tensor

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuiltLayer:
    """One layer, built and checked."""

    module: nn.Module
    out_shape: Shape
    tensors: tuple[str, ...]  # the file's tensor names this layer reads


Builder = Callable[[Mapping[str, Any], Mapping[str, torch.Tensor], Shape, str], BuiltLayer]
SpecOf = Callable[[nn.Module], dict[str, Any]]  # a module -> its spec (without "tensor"); SpecError: why not


@dataclass(frozen=True)
class LayerType:
    """One format-1 layer type.

    Attributes:
        name: the spec's ``type``.
        keys: the keys its spec may take besides ``type``.
        build: spec -> checked module (``Builder``).
        modules: the torch module classes that are this layer (``save_model``, ``convert``).
        exact: match ``modules`` by exact class (activations: a subclass may compute something else).
        spec_of: a matching module -> its spec; raises ``SpecError`` saying why format 1 cannot hold it.
        functions: traced torch functions computing this layer -> a module doing the same,
            called with the call's arguments after the input.
        methods: tensor method names (``x.relu()``) -> such a module factory.
    """

    name: str
    keys: frozenset[str]
    build: Builder
    modules: tuple[type[nn.Module], ...] = ()
    exact: bool = False
    spec_of: SpecOf | None = None
    functions: Mapping[Any, Callable[..., nn.Module]] = field(default_factory=dict)
    methods: Mapping[str, Callable[..., nn.Module]] = field(default_factory=dict)

    def matches(self, module: nn.Module) -> bool:
        """``module`` computes this layer type."""
        if isinstance(module, Elementwise):
            return module.name == self.name
        return type(module) in self.modules if self.exact else isinstance(module, self.modules)

    @property
    def holds_tensors(self) -> bool:
        return "tensor" in self.keys


LAYER_TYPES: dict[str, LayerType] = {}
DROPPED = (nn.Dropout, nn.Identity)  # identities at evaluation time: left out of format 1


def register(
    name: str,
    keys: tuple[str, ...] = (),
    *,
    modules: tuple[type[nn.Module], ...] = (),
    exact: bool = False,
    spec_of: SpecOf | None = None,
    functions: Mapping[Any, Callable[..., nn.Module]] | None = None,
    methods: Mapping[str, Callable[..., nn.Module]] | None = None,
) -> Callable[[Builder], Builder]:
    """Register the builder of layer type ``name`` and what else is known of it (see ``LayerType``)."""

    def decorate(builder: Builder) -> Builder:
        LAYER_TYPES[name] = LayerType(
            name, frozenset(keys), builder, modules, exact, spec_of, dict(functions or {}), dict(methods or {})
        )
        return builder

    return decorate


def describe(spec: Mapping[str, Any]) -> str:
    """A short label for a layer spec: ``linear "encoder.0"``."""
    kind = spec.get("type", "?")
    return f'{kind} "{spec["tensor"]}"' if "tensor" in spec else str(kind)


def build_layer(
    spec: Any, tensors: Mapping[str, torch.Tensor], in_shape: Shape, label: str, covariates: Mapping[str, int] | None = None
) -> BuiltLayer:
    """Build one layer from its spec, checked against ``in_shape``.

    Args:
        spec: the layer's JSON object from the document.
        tensors: every tensor of the file, by name.
        in_shape: the shape reaching this layer, without the batch axis.
        label: how messages name the layer, e.g. ``decoder layer 2 (linear "decoder.2")``.
        covariates: the widths of the document's covariates, by name, for a layer taking some.

    Raises:
        SpecError: unknown type or key, missing tensor, or shapes that do not meet.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise SpecError(f"{label}: a layer must be an object with a string \"type\", found {spec!r}")
    kind = spec["type"]
    if kind not in LAYER_TYPES:
        raise SpecError(f"{label}: unknown layer type {kind!r}; format 1 has {', '.join(LAYER_TYPES)}")
    layer_type = LAYER_TYPES[kind]
    unknown = sorted(set(spec) - layer_type.keys - {"type"})
    if unknown:
        raise SpecError(f"{label}: unknown key(s) {', '.join(unknown)} for a {kind} layer")
    if "covariates" in spec:
        return layer_type.build(spec, tensors, in_shape, label, covariates=covariates or {})
    return layer_type.build(spec, tensors, in_shape, label)


def layer_spec(name: str, module: nn.Module) -> dict[str, Any] | None:
    """The format-1 spec of ``module`` (named ``name`` in its state dict); None for a module left out.

    Raises:
        VaeevalError: no layer type holds this module, naming it and why.
    """
    if isinstance(module, DROPPED):
        return None
    for layer_type in LAYER_TYPES.values():
        if layer_type.matches(module):
            try:
                spec = {"type": layer_type.name, **(layer_type.spec_of(module) if layer_type.spec_of else {})}
            except SpecError as why:
                raise VaeevalError(f"{name} ({type(module).__name__}) cannot be expressed in format 1: {why}") from None
            return {**spec, "tensor": name} if layer_type.holds_tensors else spec
    raise VaeevalError(f"{name} ({type(module).__name__}) cannot be expressed in format 1: format 1 has no such layer")


def is_layer_module(module: nn.Module) -> bool:
    """A module some layer type matches (or one left out, like Dropout)."""
    return isinstance(module, DROPPED) or any(t.matches(module) for t in LAYER_TYPES.values())


def function_layer(target: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> nn.Module | None:
    """The module computing a traced call of function ``target`` (args after the input), or None."""
    for layer_type in LAYER_TYPES.values():
        if target in layer_type.functions:
            return layer_type.functions[target](*args, **kwargs)
    return None


def method_layer(name: str, args: tuple[Any, ...]) -> nn.Module | None:
    """The module computing a traced tensor method call ``x.name(*args)``, or None."""
    for layer_type in LAYER_TYPES.values():
        if name in layer_type.methods:
            return layer_type.methods[name](*args)
    return None


def shape_text(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def weight_and_bias(
    spec: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    rank: int,
    label: str,
    out_axis: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...]]:
    prefix = spec.get("tensor")
    if not isinstance(prefix, str) or not prefix:
        raise SpecError(f"{label}: needs \"tensor\", the name prefix of its weights")
    weight_name, bias_name = f"{prefix}.weight", f"{prefix}.bias"
    weight = named_tensor(tensors, weight_name, f"{label}:")
    if weight.dim() != rank:
        raise SpecError(f"{label}: {weight_name} is {shape_text(weight.shape)}, a {rank}-D tensor is needed")
    bias = tensors.get(bias_name)
    if bias is not None and tuple(bias.shape) != (weight.shape[out_axis],):
        raise SpecError(f"{label}: {bias_name} is {shape_text(bias.shape)}, expected [{weight.shape[out_axis]}]")
    names = (weight_name,) if bias is None else (weight_name, bias_name)
    return weight, bias, names


def assign_parameters(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    module.load_state_dict(state, assign=True)
    return module.requires_grad_(False)


def format_shape(shape: tuple[int, ...] | torch.Size) -> str:
    """``[1, 28, 28]``: how messages and tables write a shape."""
    return shape_text(shape)


class Elementwise(nn.Module):
    """An activation computed from elementwise operations whose result does not depend on position.

    torch's vectorized CPU kernels for sigmoid, SiLU, softplus and ELU handle a tensor's
    last few elements with a scalar path that rounds differently, and change their last
    bit with the CPU's vector instructions, so an element's value would depend on where
    it sits in the batch and on the machine. These forms (``numerics``: exp and log with
    exactly rounded arithmetic around them) give every point the same numbers whatever
    the batch, chunk and ISA; they agree with torch's to a unit in the last place.
    """

    def __init__(self, name: str, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.name, self.function = name, function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)

    def extra_repr(self) -> str:
        return self.name


def require(condition: bool, why: str) -> None:
    if not condition:
        raise SpecError(why)
