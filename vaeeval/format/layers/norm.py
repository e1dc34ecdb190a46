"""Layer norm: each point's features standardized by their own mean and variance (scVI's ``use_layer_norm``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from vaeeval.core import numerics
from vaeeval.errors import SpecError
from vaeeval.format.layers.base import BuiltLayer, register, require, shape_text
from vaeeval.format.specs import named_tensor


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) over the last axis, the biased variance, then ``weight`` and ``bias`` if given.

    The mean and variance are pairwise tree sums (``numerics.tree_sum``), so a point's
    numbers depend neither on the other points nor on the CPU's vector width, as torch's
    own ``layer_norm`` kernel's last bits do.
    """

    def __init__(self, features: int, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.features, self.eps, self.normalized_shape = features, eps, (features,)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = numerics.tree_sum(x) / self.features
        centered = x - mean[..., None]
        variance = numerics.tree_sum(centered * centered) / self.features
        y = centered / torch.sqrt(variance + self.eps)[..., None]
        return y if self.weight is None else y * self.weight + self.bias


def _layer_norm_spec(module: nn.Module) -> dict[str, Any]:
    require(len(module.normalized_shape) == 1, f"normalized_shape {list(module.normalized_shape)}: format 1 normalizes the last axis")
    return {"eps": float(module.eps)}


@register("layer_norm", ("tensor", "eps"), modules=(nn.LayerNorm, LayerNorm), spec_of=_layer_norm_spec)
def _layer_norm(spec, tensors, in_shape, label):
    eps = spec.get("eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise SpecError(f"{label}: eps must be a non-negative number, found {eps!r}")
    if len(in_shape) != 1:
        raise SpecError(f"{label}: needs [features], the previous layer gives {shape_text(in_shape)}")
    prefix, found, names = spec.get("tensor"), {}, []
    if prefix is not None:
        if not isinstance(prefix, str) or not prefix:
            raise SpecError(f"{label}: \"tensor\" must be the name prefix of its weight and bias")
        for key in ("weight", "bias"):
            name = f"{prefix}.{key}"
            if name in tensors:
                tensor = named_tensor(tensors, name, f"{label}:")
                if tuple(tensor.shape) != tuple(in_shape):
                    raise SpecError(f"{label}: {name} is {shape_text(tensor.shape)}, the previous layer gives {shape_text(in_shape)}")
                found[key], names = tensor, [*names, name]
        if ("weight" in found) != ("bias" in found):
            raise SpecError(f"{label}: give both {prefix}.weight and {prefix}.bias, or neither")
    module = LayerNorm(in_shape[0], float(eps), found.get("weight"), found.get("bias"))
    return BuiltLayer(module.eval().requires_grad_(False), in_shape, tuple(names))
