"""Convolutions and transposed convolutions, their inputs channels-last."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vaeeval.errors import SpecError
from vaeeval.format.layers.base import BuiltLayer, Shape, assign_parameters, register, shape_text, weight_and_bias
from vaeeval.format.specs import is_integer

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
            f"{label}: needs a [channels, height, width] input, the previous layer gives {shape_text(in_shape)}"
        )
    if in_shape[0] != channels:
        raise SpecError(
            f"{label}: weight is {shape_text(weight.shape)} ({channels} input channels), "
            f"the previous layer gives {shape_text(in_shape)} ({in_shape[0]} channels)"
        )
    return in_shape[1], in_shape[2]


def _checked_size(size: tuple[int, int], in_shape: Shape, label: str) -> tuple[int, int]:
    if min(size) < 1:
        raise SpecError(f"{label}: an input of {shape_text(in_shape)} gives an empty output {shape_text(size)}")
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
    weight, bias, names = weight_and_bias(spec, tensors, 4, label)
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
    return BuiltLayer(assign_parameters(module, weight, bias), (out_ch, *size), names)


@register("conv_transpose2d", ("tensor", "stride", "padding", "output_padding"), modules=(nn.ConvTranspose2d,),
          spec_of=_conv_spec)
def _conv_transpose2d(spec, tensors, in_shape, label):
    weight, bias, names = weight_and_bias(spec, tensors, 4, label, out_axis=1)
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
    return BuiltLayer(assign_parameters(module, weight, bias), (out_ch, *size), names)
