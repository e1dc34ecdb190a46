"""Elementwise layers: activations in forms whose bits do not depend on the CPU, log1p, leaky ReLU."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vaeeval.core import numerics
from vaeeval.errors import SpecError
from vaeeval.format.layers.base import BuiltLayer, Elementwise, register, require


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


def _exact_gelu(module: nn.Module) -> dict[str, Any]:
    require(module.approximate == "none", "approximate='tanh'; format 1's gelu is the exact one")
    return {}


def _unit_elu(module: nn.Module) -> dict[str, Any]:
    require(module.alpha == 1.0, f"alpha={module.alpha}; format 1's elu has alpha 1")
    return {}


def _plain_softplus(module: nn.Module) -> dict[str, Any]:
    require(module.beta == 1 and module.threshold == 20, "format 1's softplus has beta 1 and threshold 20")
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


class Softmax(nn.Module):
    """exp(log_softmax(x)) over a point's features, with ``numerics.log_softmax``'s fixed bits (scVI's logistic-normal z)."""

    dim = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(numerics.log_softmax(x))


def _last_axis(module: nn.Module) -> dict[str, Any]:
    require(module.dim in (-1, 1), f"dim={module.dim}; format 1's softmax is over a point's features (dim -1)")
    return {}


@register("softmax", modules=(nn.Softmax, Softmax), spec_of=_last_axis)
def _softmax(spec, tensors, in_shape, label):
    if len(in_shape) != 1:
        raise SpecError(f"{label}: needs [features], the previous layer gives {list(in_shape)}")
    return BuiltLayer(Softmax(), in_shape, ())


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
