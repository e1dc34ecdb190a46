"""The layer table of format 1 (FORMAT.md, "Layers"): one registry entry per layer type.

A ``LayerType`` says everything vaeeval knows about one layer: the keys its spec
takes, how to build it, which torch modules are that layer (for ``save_model``)
and which traced function and method calls compute it (for ``convert``). Adding
a layer type means adding one entry here.

A builder checks its keys and tensors against the shape that reaches it (a dry
shape check: nothing is computed) and returns the module and the shape it
gives, so a file whose shapes do not chain is refused with the layer and both
shapes named before any data is touched. Shapes here never include the batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaeeval.core import numerics
from vaeeval.errors import SpecError, VaeevalError
from vaeeval.format.specs import is_integer, named_tensor

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


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _weight_and_bias(
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
        raise SpecError(f"{label}: {weight_name} is {_fmt(weight.shape)}, a {rank}-D tensor is needed")
    bias = tensors.get(bias_name)
    if bias is not None and tuple(bias.shape) != (weight.shape[out_axis],):
        raise SpecError(f"{label}: {bias_name} is {_fmt(bias.shape)}, expected [{weight.shape[out_axis]}]")
    names = (weight_name,) if bias is None else (weight_name, bias_name)
    return weight, bias, names


def _assign(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    module.load_state_dict(state, assign=True)
    return module.requires_grad_(False)


def _onednn_linear() -> Callable[..., torch.Tensor] | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


class Linear(nn.Linear):
    """``nn.Linear`` whose float32 CPU product runs on oneDNN, the bias added inside it.

    For float32 on the CPU, torch sends ``F.linear`` to MKL's SGEMM, which first copies
    the bias into every output row and then accumulates the product on top. oneDNN's
    matmul adds the bias in its epilogue and is 7-10% faster on the decoder shapes that
    dominate an evaluation (``benchmarks/bench.py``). It is reached through the operator
    torch's own compiler (inductor) emits for CPU linear layers. Like SGEMM, each row of
    its result is independent of the other rows once there are 64 or more
    (``model.rows_independently``). Off the CPU, for other dtypes, with a torch built
    without oneDNN, with ``torch.backends.mkldnn`` disabled or when gradients are wanted, this is ``nn.Linear``.
    The operator is private torch API: should a call to it fail (a torch that changed
    it), it is dropped for the rest of the process and ``nn.Linear`` computes instead.

    ``relu=True`` applies a ReLU after it (``Chain`` asks for it when a ReLU layer follows):
    on oneDNN inside the product's epilogue, saving a pass over the output. max(y, 0) is
    exact either way.
    """

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        global _ONEDNN_LINEAR
        if (
            _ONEDNN_LINEAR is not None
            and torch.backends.mkldnn.enabled
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))  # no autograd there
        ):
            try:
                return _ONEDNN_LINEAR(x, self.weight, self.bias, "relu" if relu else "none", [], "")
            except (RuntimeError, TypeError):
                _ONEDNN_LINEAR = None
        return torch.relu(super().forward(x)) if relu else super().forward(x)


class CovariateLinear(nn.Module):
    """A linear layer whose input is the features followed by the point's covariates (FORMAT.md, "Covariates").

    The weight ``[out, features + covariate widths]`` is split: the covariates' part is a
    per-row offset added to the features' product, so the covariates are never copied
    beside every sample's features.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, covariates: tuple[str, ...], features: int) -> None:
        super().__init__()
        self.covariates = covariates
        with torch.device("meta"):
            linear = Linear(features, weight.shape[0], bias=bias is not None)
        self.linear = _assign(linear, weight[:, :features].contiguous(), bias)
        self.register_buffer("covariate_weight", weight[:, features:].contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, encoded: Mapping[str, torch.Tensor]) -> torch.Tensor:
        given = torch.cat([encoded[name] for name in self.covariates], dim=-1).to(x.dtype)
        weight, bias = self.linear.weight, self.linear.bias
        offset = given @ self.covariate_weight.T if bias is None else torch.addmm(bias, given, self.covariate_weight.T)
        return torch.addmm(offset, x, weight.T)

    def extra_repr(self) -> str:
        return f"covariates={list(self.covariates)}"


class Chain(nn.Sequential):
    """``nn.Sequential`` that hands the points' encoded covariates (name -> ``[N, width]``) to the layers taking them."""

    def forward(self, x: torch.Tensor, encoded: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        layers = list(self)
        fused = False  # the previous Linear applied this ReLU already
        for layer, after in zip(layers, [*layers[1:], None], strict=True):
            if fused:
                fused = False
            elif isinstance(layer, CovariateLinear):
                x = layer(x, encoded)
            elif isinstance(layer, Linear) and type(after) is nn.ReLU:
                x, fused = layer(x, relu=True), True
            else:
                x = layer(x)
        return x

    @property
    def covariates(self) -> tuple[str, ...]:
        """The covariates some layer of this chain takes, in the order first taken."""
        names = [name for layer in self if isinstance(layer, CovariateLinear) for name in layer.covariates]
        return tuple(dict.fromkeys(names))


@register("linear", ("tensor", "covariates"), modules=(nn.Linear,))
def _linear(spec, tensors, in_shape, label, covariates: Mapping[str, int] | None = None):
    weight, bias, names = _weight_and_bias(spec, tensors, 2, label)
    out_features, in_features = weight.shape
    taken = _taken_covariates(spec, covariates or {}, label)
    width = sum((covariates or {})[name] for name in taken)
    if taken and len(in_shape) != 1:
        raise SpecError(f"{label}: a layer taking covariates needs flat features, the previous layer gives {_fmt(in_shape)}")
    if not in_shape or in_shape[-1] + width != in_features:
        given = f" + {width} of covariates {', '.join(taken)}" if taken else ""
        raise SpecError(
            f"{label}: weight is {_fmt(weight.shape)}, the previous layer gives "
            f"{_fmt(in_shape)} ({in_shape[-1] if in_shape else 0} features{given}, {in_features} needed)"
        )
    if taken:
        return BuiltLayer(CovariateLinear(weight, bias, taken, in_shape[-1]), (out_features,), names)
    with torch.device("meta"):
        module = Linear(in_features, out_features, bias=bias is not None)
    return BuiltLayer(_assign(module, weight, bias), (*in_shape[:-1], out_features), names)


def _taken_covariates(spec: Mapping[str, Any], widths: Mapping[str, int], label: str) -> tuple[str, ...]:
    """The names of a layer's ``covariates`` key, each declared by the document."""
    names = spec.get("covariates", [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
        raise SpecError(f"{label}: covariates must be a list of distinct covariate names, found {names!r}")
    unknown = [name for name in names if name not in widths]
    if unknown:
        declared = ", ".join(widths) or "none"
        raise SpecError(f"{label}: takes covariate {unknown[0]!r}, which the document's \"covariates\" does not declare ({declared})")
    return tuple(names)


def _batch_norm_spec(module: nn.Module) -> dict[str, Any]:
    _require(module.track_running_stats and module.running_mean is not None, "a batch norm without running statistics")
    return {"eps": float(module.eps)}


@register("batch_norm", ("tensor", "eps"), modules=(nn.BatchNorm1d, nn.BatchNorm2d), spec_of=_batch_norm_spec)
def _batch_norm(spec, tensors, in_shape, label):
    prefix = spec.get("tensor")
    if not isinstance(prefix, str) or not prefix:
        raise SpecError(f"{label}: needs \"tensor\", the name prefix of its running statistics")
    eps = spec.get("eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise SpecError(f"{label}: eps must be a non-negative number, found {eps!r}")
    channels = in_shape[0] if in_shape else 0
    found, names = {}, []
    for key, required in (("running_mean", True), ("running_var", True), ("weight", False), ("bias", False)):
        name = f"{prefix}.{key}"
        if name not in tensors and not required:
            continue
        tensor = named_tensor(tensors, name, f"{label}:")
        if tuple(tensor.shape) != (channels,):
            raise SpecError(f"{label}: {name} is {_fmt(tensor.shape)}, the previous layer gives {_fmt(in_shape)} ({channels} channels)")
        found[key] = tensor
        names.append(name)
    if (found["running_var"] < 0).any():
        raise SpecError(f"{label}: {prefix}.running_var has negative variances")
    if len(in_shape) not in (1, 3):
        raise SpecError(f"{label}: needs [features] or [channels, height, width], the previous layer gives {_fmt(in_shape)}")
    if ("weight" in found) != ("bias" in found):
        raise SpecError(f"{label}: give both {prefix}.weight and {prefix}.bias, or neither")
    kind = nn.BatchNorm1d if len(in_shape) == 1 else nn.BatchNorm2d
    module = kind(channels, eps=float(eps), affine="weight" in found)
    module.load_state_dict({**found, "num_batches_tracked": torch.tensor(0)}, assign=True)
    return BuiltLayer(module.eval().requires_grad_(False), in_shape, tuple(names))


_LARGEST_STEP = 1 << 16  # strides and paddings of an image layer


def _pair(spec: Mapping[str, Any], key: str, default: int, minimum: int, label: str) -> tuple[int, int]:
    value = spec.get(key, default)
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(is_integer(v, minimum, _LARGEST_STEP) for v in pair):
        raise SpecError(
            f"{label}: {key} must be an integer from {minimum} to {_LARGEST_STEP} or a pair of them, found {value!r}"
        )
    return int(pair[0]), int(pair[1])


def _image_input(in_shape: Shape, channels: int, weight: torch.Tensor, label: str) -> tuple[int, int]:
    if len(in_shape) != 3:
        raise SpecError(
            f"{label}: needs a [channels, height, width] input, the previous layer gives {_fmt(in_shape)}"
        )
    if in_shape[0] != channels:
        raise SpecError(
            f"{label}: weight is {_fmt(weight.shape)} ({channels} input channels), "
            f"the previous layer gives {_fmt(in_shape)} ({in_shape[0]} channels)"
        )
    return in_shape[1], in_shape[2]


def _checked_size(size: tuple[int, int], in_shape: Shape, label: str) -> tuple[int, int]:
    if min(size) < 1:
        raise SpecError(f"{label}: an input of {_fmt(in_shape)} gives an empty output {_fmt(size)}")
    return size


def _int_or_pair(value: Any) -> int | list[int]:
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    return int(pair[0]) if pair[0] == pair[1] else [int(pair[0]), int(pair[1])]


def _conv_spec(module: nn.Module) -> dict[str, Any]:
    if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros":
        raise SpecError("only groups=1, dilation=1 and zero padding are in format 1")
    if isinstance(module.padding, str):
        raise SpecError(f"padding={module.padding!r}; give the padding as numbers")
    spec = {"stride": _int_or_pair(module.stride), "padding": _int_or_pair(module.padding)}
    if isinstance(module, nn.ConvTranspose2d):
        spec["output_padding"] = _int_or_pair(module.output_padding)
    return spec


class _ChannelsLast:
    """A convolution that takes a CPU image batch in channels-last order.

    oneDNN then runs it without reordering each call (measured on the benchmark's
    decoder: transposed convolutions 1.5-1.7x faster). The output stays channels-last;
    the numbers are those of the default order (tests compare both), each row
    independent of the others.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class Conv2d(_ChannelsLast, nn.Conv2d):
    """``nn.Conv2d``, channels-last on the CPU."""


class ConvTranspose2d(_ChannelsLast, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d``, channels-last on the CPU."""


@register("conv2d", ("tensor", "stride", "padding"), modules=(nn.Conv2d,), spec_of=_conv_spec)
def _conv2d(spec, tensors, in_shape, label):
    weight, bias, names = _weight_and_bias(spec, tensors, 4, label)
    out_ch, in_ch, kh, kw = weight.shape
    stride = _pair(spec, "stride", 1, 1, label)
    padding = _pair(spec, "padding", 0, 0, label)
    h, w = _image_input(in_shape, in_ch, weight, label)
    size = _checked_size(
        ((h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1),
        in_shape,
        label,
    )
    with torch.device("meta"):
        module = Conv2d(in_ch, out_ch, (kh, kw), stride, padding, bias=bias is not None)
    return BuiltLayer(_assign(module, weight, bias), (out_ch, *size), names)


@register("conv_transpose2d", ("tensor", "stride", "padding", "output_padding"), modules=(nn.ConvTranspose2d,),
          spec_of=_conv_spec)
def _conv_transpose2d(spec, tensors, in_shape, label):
    weight, bias, names = _weight_and_bias(spec, tensors, 4, label, out_axis=1)
    in_ch, out_ch, kh, kw = weight.shape
    stride = _pair(spec, "stride", 1, 1, label)
    padding = _pair(spec, "padding", 0, 0, label)
    output_padding = _pair(spec, "output_padding", 0, 0, label)
    if output_padding[0] >= stride[0] or output_padding[1] >= stride[1]:
        raise SpecError(f"{label}: output_padding {list(output_padding)} must be smaller than stride {list(stride)}")
    h, w = _image_input(in_shape, in_ch, weight, label)
    size = _checked_size(
        (
            (h - 1) * stride[0] - 2 * padding[0] + kh + output_padding[0],
            (w - 1) * stride[1] - 2 * padding[1] + kw + output_padding[1],
        ),
        in_shape,
        label,
    )
    with torch.device("meta"):
        module = ConvTranspose2d(in_ch, out_ch, (kh, kw), stride, padding, output_padding, bias=bias is not None)
    return BuiltLayer(_assign(module, weight, bias), (out_ch, *size), names)


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


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-numerics.softplus(-x))


class _Tanh(torch.autograd.Function):
    """torch's tanh (MKL's, the same bits on every ISA) with its gradient (1 - y²) g in separate exact
    operations: ATen's tanh_backward fuses them differently per vector ISA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


_POSITION_INDEPENDENT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": _Tanh.apply,
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "softplus": numerics.softplus,
    "elu": lambda x: torch.where(x > 0, x, numerics.expm1(x)),
}


def _plain(make: Callable[[], nn.Module]) -> Callable[..., nn.Module]:
    """A factory ignoring a traced call's extra arguments (``inplace=True``)."""
    return lambda *args, **kwargs: make()


def _same(module: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A factory for a functional whose arguments after the input are the module's (``F.elu(x, alpha)``, ``nn.ELU(alpha)``)."""
    return lambda *args, **kwargs: module(*args, **kwargs)


def _flatten_call(start_dim: int = 0, end_dim: int = -1) -> nn.Module:
    """``torch.flatten(x, ...)`` and ``x.flatten(...)`` start at axis 0, ``nn.Flatten`` at 1: say so."""
    return nn.Flatten(start_dim, end_dim)


def _require(condition: bool, why: str) -> None:
    if not condition:
        raise SpecError(why)


def _exact_gelu(module: nn.Module) -> dict[str, Any]:
    _require(module.approximate == "none", "approximate='tanh'; format 1's gelu is the exact one")
    return {}


def _unit_elu(module: nn.Module) -> dict[str, Any]:
    _require(module.alpha == 1.0, f"alpha={module.alpha}; format 1's elu has alpha 1")
    return {}


def _plain_softplus(module: nn.Module) -> dict[str, Any]:
    _require(module.beta == 1 and module.threshold == 20, "format 1's softplus has beta 1 and threshold 20")
    return {}


_ACTIVATIONS: dict[str, dict[str, Any]] = {  # registration order is the order messages list the types in
    "relu": {"modules": (nn.ReLU,), "functions": {F.relu: _plain(nn.ReLU), torch.relu: _plain(nn.ReLU)},
             "methods": {"relu": _plain(nn.ReLU)}},
    "gelu": {"modules": (nn.GELU,), "spec_of": _exact_gelu,
             "functions": {F.gelu: _same(nn.GELU)}},
    "tanh": {"modules": (nn.Tanh,), "functions": {torch.tanh: _plain(nn.Tanh), F.tanh: _plain(nn.Tanh)},
             "methods": {"tanh": _plain(nn.Tanh)}},
    "sigmoid": {"modules": (nn.Sigmoid,), "functions": {torch.sigmoid: _plain(nn.Sigmoid), F.sigmoid: _plain(nn.Sigmoid)},
                "methods": {"sigmoid": _plain(nn.Sigmoid)}},
    "silu": {"modules": (nn.SiLU,), "functions": {F.silu: _plain(nn.SiLU)}},
    "softplus": {"modules": (nn.Softplus,), "spec_of": _plain_softplus,
                 "functions": {F.softplus: _same(nn.Softplus)}},
    "elu": {"modules": (nn.ELU,), "spec_of": _unit_elu,
            "functions": {F.elu: _same(nn.ELU)}},
}
for _name, _known in _ACTIVATIONS.items():
    _function = _POSITION_INDEPENDENT.get(_name)
    _make = _known["modules"][0] if _function is None else (
        lambda name=_name, function=_function: Elementwise(name, function)
    )
    register(_name, exact=True, **_known)(
        lambda spec, tensors, in_shape, label, make=_make: BuiltLayer(make(), in_shape, ())
    )


log1p = numerics.log1p


def _log1p_module(*args: Any, **kwargs: Any) -> nn.Module:
    return Elementwise("log1p", log1p)


@register("log1p", exact=True, functions={torch.log1p: _log1p_module}, methods={"log1p": _log1p_module})
def _log1p(spec, tensors, in_shape, label):
    return BuiltLayer(Elementwise("log1p", log1p), in_shape, ())


@register(
    "leaky_relu", ("negative_slope",), modules=(nn.LeakyReLU,),
    spec_of=lambda module: {"negative_slope": module.negative_slope},
    functions={F.leaky_relu: _same(nn.LeakyReLU)},
)
def _leaky_relu(spec, tensors, in_shape, label):
    slope = spec.get("negative_slope", 0.01)
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise SpecError(f"{label}: negative_slope must be a number, found {slope!r}")
    return BuiltLayer(nn.LeakyReLU(float(slope)), in_shape, ())


def _flatten_spec(module: nn.Module) -> dict[str, Any]:
    _require(module.start_dim == 1 and module.end_dim == -1, "format 1's flatten flattens every axis but the batch axis")
    return {}


@register(
    "flatten", modules=(nn.Flatten,), spec_of=_flatten_spec,
    functions={torch.flatten: _flatten_call},
    methods={"flatten": _flatten_call},
)
def _flatten(spec, tensors, in_shape, label):
    return BuiltLayer(nn.Flatten(), (math.prod(in_shape),), ())


class Reshape(nn.Module):
    """Reshape everything but the batch axis (format 1's ``unflatten``)."""

    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}"


def _unflatten_spec(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, Reshape):
        return {"shape": list(module.shape)}
    _require(module.dim in (1, -1), "format 1's unflatten reshapes the features of a flat input")
    return {"shape": [int(s) for s in module.unflattened_size]}


@register("unflatten", ("shape",), modules=(nn.Unflatten, Reshape), spec_of=_unflatten_spec)
def _unflatten(spec, tensors, in_shape, label):
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(is_integer(s, 1) for s in shape):
        raise SpecError(f"{label}: shape must be a list of positive integers, found {shape!r}")
    if math.prod(shape) != math.prod(in_shape):
        raise SpecError(
            f"{label}: shape {_fmt(shape)} holds {math.prod(shape)} features, "
            f"the previous layer gives {_fmt(in_shape)} ({math.prod(in_shape)})"
        )
    return BuiltLayer(Reshape(tuple(shape)), tuple(shape), ())


def format_shape(shape: tuple[int, ...] | torch.Size) -> str:
    """``[1, 28, 28]``: how messages and tables write a shape."""
    return _fmt(shape)
