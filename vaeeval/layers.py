"""The layer table of format 1 (FORMAT.md, "Layers") as torch modules.

Each layer type registers a builder. A builder checks its keys and tensors
against the shape that reaches it (a dry shape check: nothing is computed) and
returns the module and the shape it gives, so a file whose shapes do not chain
is refused with the layer and both shapes named before any data is touched.
Shapes here never include the batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vaeeval.errors import SpecError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuiltLayer:
    """One layer, built and checked."""

    module: nn.Module
    out_shape: Shape
    tensors: tuple[str, ...]  # the file's tensor names this layer reads


Builder = Callable[[Mapping[str, Any], Mapping[str, torch.Tensor], Shape, str], BuiltLayer]
_BUILDERS: dict[str, Builder] = {}
_KEYS: dict[str, frozenset[str]] = {}


def register(name: str, keys: tuple[str, ...] = ()) -> Callable[[Builder], Builder]:
    """Register a builder for layer type ``name`` taking the optional ``keys``."""

    def decorate(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        _KEYS[name] = frozenset(("type", *keys))
        return builder

    return decorate


def describe(spec: Mapping[str, Any]) -> str:
    """A short label for a layer spec: ``linear "encoder.0"``."""
    kind = spec.get("type", "?")
    return f'{kind} "{spec["tensor"]}"' if "tensor" in spec else str(kind)


def build_layer(
    spec: Any, tensors: Mapping[str, torch.Tensor], in_shape: Shape, label: str
) -> BuiltLayer:
    """Build one layer from its spec, checked against ``in_shape``.

    Args:
        spec: the layer's JSON object from the document.
        tensors: every tensor of the file, by name.
        in_shape: the shape reaching this layer, without the batch axis.
        label: how messages name the layer, e.g. ``decoder layer 2 (linear "decoder.2")``.

    Raises:
        SpecError: unknown type or key, missing tensor, or shapes that do not meet.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise SpecError(f"{label}: a layer must be an object with a string \"type\", found {spec!r}")
    kind = spec["type"]
    if kind not in _BUILDERS:
        raise SpecError(f"{label}: unknown layer type {kind!r}; format 1 has {', '.join(_BUILDERS)}")
    unknown = sorted(set(spec) - _KEYS[kind])
    if unknown:
        raise SpecError(f"{label}: unknown key(s) {', '.join(unknown)} for a {kind} layer")
    return _BUILDERS[kind](spec, tensors, in_shape, label)


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
    if weight_name not in tensors:
        raise SpecError(f"{label}: names tensor {weight_name!r}, which the file does not have")
    weight = tensors[weight_name]
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
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _ONEDNN_LINEAR is not None
            and torch.backends.mkldnn.enabled
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))  # no autograd there
        ):
            return _ONEDNN_LINEAR(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


@register("linear", ("tensor",))
def _linear(spec, tensors, in_shape, label):
    weight, bias, names = _weight_and_bias(spec, tensors, 2, label)
    out_features, in_features = weight.shape
    if not in_shape or in_shape[-1] != in_features:
        raise SpecError(
            f"{label}: weight is {_fmt(weight.shape)}, the previous layer gives "
            f"{_fmt(in_shape)} ({in_shape[-1] if in_shape else 0} features, {in_features} needed)"
        )
    with torch.device("meta"):
        module = Linear(in_features, out_features, bias=bias is not None)
    return BuiltLayer(_assign(module, weight, bias), (*in_shape[:-1], out_features), names)


def _pair(spec: Mapping[str, Any], key: str, default: int, minimum: int, label: str) -> tuple[int, int]:
    value = spec.get(key, default)
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)
    ):
        raise SpecError(f"{label}: {key} must be an integer >= {minimum} or a pair of them, found {value!r}")
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


@register("conv2d", ("tensor", "stride", "padding"))
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
        module = nn.Conv2d(in_ch, out_ch, (kh, kw), stride, padding, bias=bias is not None)
    return BuiltLayer(_assign(module, weight, bias), (out_ch, *size), names)


@register("conv_transpose2d", ("tensor", "stride", "padding", "output_padding"))
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
        module = nn.ConvTranspose2d(
            in_ch, out_ch, (kh, kw), stride, padding, output_padding, bias=bias is not None
        )
    return BuiltLayer(_assign(module, weight, bias), (out_ch, *size), names)


class Elementwise(nn.Module):
    """An activation computed from elementwise operations whose result does not depend on position.

    torch's vectorized CPU kernels for sigmoid, SiLU, softplus and (float64) ELU handle
    a tensor's last few elements with a scalar path that rounds differently, so an
    element's value would depend on where it sits in the batch. These forms (through
    log-sigmoid, exp and expm1, which do not) give every point the same numbers whatever
    the batch and chunk sizes; they agree with torch's to a unit in the last place.
    """

    def __init__(self, name: str, function: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.name, self.function = name, function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)

    def extra_repr(self) -> str:
        return self.name


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(nn.functional.logsigmoid(x))


_POSITION_INDEPENDENT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: -nn.functional.logsigmoid(-x),
    "elu": lambda x: torch.where(x > 0, x, torch.expm1(x)),
}


def _activation(name: str, make: Callable[[], nn.Module]) -> None:
    register(name)(lambda spec, tensors, in_shape, label: BuiltLayer(make(), in_shape, ()))


for _name, _make in {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}.items():
    _activation(_name, _make)
for _name, _function in _POSITION_INDEPENDENT.items():
    _activation(_name, lambda name=_name, function=_function: Elementwise(name, function))


@register("leaky_relu", ("negative_slope",))
def _leaky_relu(spec, tensors, in_shape, label):
    slope = spec.get("negative_slope", 0.01)
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise SpecError(f"{label}: negative_slope must be a number, found {slope!r}")
    return BuiltLayer(nn.LeakyReLU(float(slope)), in_shape, ())


@register("flatten")
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


@register("unflatten", ("shape",))
def _unflatten(spec, tensors, in_shape, label):
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
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
