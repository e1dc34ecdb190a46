"""Linear layers on oneDNN with the bias and a following ReLU fused, batch norm, and the Chain that runs them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vaeeval.errors import SpecError
from vaeeval.format.layers.base import BuiltLayer, assign_parameters, register, require, shape_text, weight_and_bias
from vaeeval.format.specs import named_tensor


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
        self.linear = assign_parameters(linear, weight[:, :features].contiguous(), bias)
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
    weight, bias, names = weight_and_bias(spec, tensors, 2, label)
    out_features, in_features = weight.shape
    taken = _taken_covariates(spec, covariates or {}, label)
    width = sum((covariates or {})[name] for name in taken)
    if taken and len(in_shape) != 1:
        raise SpecError(f"{label}: a layer taking covariates needs flat features, the previous layer gives {shape_text(in_shape)}")
    if not in_shape or in_shape[-1] + width != in_features:
        given = f" + {width} of covariates {', '.join(taken)}" if taken else ""
        raise SpecError(
            f"{label}: weight is {shape_text(weight.shape)}, the previous layer gives "
            f"{shape_text(in_shape)} ({in_shape[-1] if in_shape else 0} features{given}, {in_features} needed)"
        )
    if taken:
        return BuiltLayer(CovariateLinear(weight, bias, taken, in_shape[-1]), (out_features,), names)
    with torch.device("meta"):
        module = Linear(in_features, out_features, bias=bias is not None)
    return BuiltLayer(assign_parameters(module, weight, bias), (*in_shape[:-1], out_features), names)


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
    require(module.track_running_stats and module.running_mean is not None, "a batch norm without running statistics")
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
            raise SpecError(
                f"{label}: {name} is {shape_text(tensor.shape)}, the previous layer gives {shape_text(in_shape)} ({channels} channels)"
            )
        found[key] = tensor
        names.append(name)
    if (found["running_var"] < 0).any():
        raise SpecError(f"{label}: {prefix}.running_var has negative variances")
    if len(in_shape) not in (1, 3):
        raise SpecError(f"{label}: needs [features] or [channels, height, width], the previous layer gives {shape_text(in_shape)}")
    if ("weight" in found) != ("bias" in found):
        raise SpecError(f"{label}: give both {prefix}.weight and {prefix}.bias, or neither")
    kind = nn.BatchNorm1d if len(in_shape) == 1 else nn.BatchNorm2d
    module = kind(channels, eps=float(eps), affine="weight" in found)
    module.load_state_dict({**found, "num_batches_tracked": torch.tensor(0)}, assign=True)
    return BuiltLayer(module.eval().requires_grad_(False), in_shape, tuple(names))
