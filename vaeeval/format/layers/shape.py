"""Flatten and unflatten: layers that change only the shape."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vaeeval.errors import SpecError
from vaeeval.format.layers.base import BuiltLayer, Shape, register, require, shape_text
from vaeeval.format.specs import is_integer


def _flatten_call(start_dim: int = 0, end_dim: int = -1) -> nn.Module:
    """``torch.flatten(x, ...)`` and ``x.flatten(...)`` start at axis 0, ``nn.Flatten`` at 1: say so."""
    return nn.Flatten(start_dim, end_dim)


def _flatten_spec(module: nn.Module) -> dict[str, Any]:
    require(module.start_dim == 1 and module.end_dim == -1, "format 1's flatten flattens every axis but the batch axis")
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
    require(module.dim in (1, -1), "format 1's unflatten reshapes the features of a flat input")
    return {"shape": [int(s) for s in module.unflattened_size]}


@register("unflatten", ("shape",), modules=(nn.Unflatten, Reshape), spec_of=_unflatten_spec)
def _unflatten(spec, tensors, in_shape, label):
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape or not all(is_integer(s, 1) for s in shape):
        raise SpecError(f"{label}: shape must be a list of positive integers, found {shape!r}")
    if math.prod(shape) != math.prod(in_shape):
        raise SpecError(
            f"{label}: shape {shape_text(shape)} holds {math.prod(shape)} features, "
            f"the previous layer gives {shape_text(in_shape)} ({math.prod(in_shape)})"
        )
    return BuiltLayer(Reshape(tuple(shape)), tuple(shape), ())
