"""vaeeval.format.layers: format 1's layer table, from torch modules and traced calls to built, checked layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vaeeval.format.layers.linear as linear_layers
from vaeeval import VaeevalError, load_model, save_model
from vaeeval.format.layers import (
    LAYER_TYPES,
    Linear,
    Reshape,
    build_layer,
    function_layer,
    is_layer_module,
    layer_spec,
    method_layer,
)
from vaeeval.format.layers.elementwise import Softmax
from vaeeval.format.layers.norm import LayerNorm
from vaeeval.format.model import rows_independently


def _example(cls: type[nn.Module]) -> tuple[nn.Module, tuple[int, ...]]:
    """An instance of a module class some layer type names, and the shape of one input point."""
    torch.manual_seed(0)
    examples = {
        nn.Linear: lambda: (nn.Linear(5, 3), (5,)),
        nn.Conv2d: lambda: (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 6)),
        nn.ConvTranspose2d: lambda: (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 3, 3)),
        nn.LeakyReLU: lambda: (nn.LeakyReLU(0.2), (2, 3)),
        nn.Flatten: lambda: (nn.Flatten(), (2, 3, 2)),
        nn.Unflatten: lambda: (nn.Unflatten(1, (2, 3)), (6,)),
        Reshape: lambda: (Reshape((3, 2)), (6,)),
        nn.BatchNorm1d: lambda: (_trained(nn.BatchNorm1d(5, eps=1e-3)), (5,)),
        nn.BatchNorm2d: lambda: (_trained(nn.BatchNorm2d(3)), (3, 4, 4)),
        nn.LayerNorm: lambda: (_affine(nn.LayerNorm(5, eps=1e-3)), (5,)),
        LayerNorm: lambda: (LayerNorm(5, 1e-3, torch.randn(5), torch.randn(5)), (5,)),
        nn.Softmax: lambda: (nn.Softmax(dim=-1), (5,)),
        Softmax: lambda: (Softmax(), (5,)),
    }
    if cls in examples:
        return examples[cls]()
    (layer_type,) = [t for t in LAYER_TYPES.values() if cls in t.modules]
    assert not layer_type.keys, f"add an example of {cls.__name__} to _example"
    return cls(), (2, 3)  # an activation: no keys, any shape


def _trained(norm: nn.Module) -> nn.Module:
    """A batch norm whose running statistics and affine parameters are not the identity's, in eval mode."""
    with torch.no_grad():
        for buffer in (norm.running_mean, norm.weight, norm.bias):
            buffer.copy_(torch.randn_like(buffer))
        norm.running_var.copy_(torch.rand_like(norm.running_var) + 0.1)
    return norm.eval()


def _affine(norm: nn.LayerNorm) -> nn.LayerNorm:
    """A layer norm whose weight and bias are not the identity's."""
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        norm.bias.copy_(torch.randn_like(norm.bias))
    return norm


REGISTERED = [(layer_type.name, cls) for layer_type in LAYER_TYPES.values() for cls in layer_type.modules]


@pytest.mark.parametrize(("name", "cls"), REGISTERED, ids=[f"{name}-{cls.__name__}" for name, cls in REGISTERED])
def test_every_registered_module_round_trips_through_its_spec(name, cls):
    """module -> layer_spec -> build_layer: the same layer type, computing the same numbers."""
    module, shape = _example(cls)
    spec = layer_spec("net.0", module)
    assert spec["type"] == name and set(spec) <= LAYER_TYPES[name].keys | {"type"}
    tensors = {f"net.0.{key}": value for key, value in module.state_dict().items() if value.is_floating_point()}
    built = build_layer(spec, tensors, shape, "net layer 0")
    assert set(built.tensors) == set(tensors)
    assert LAYER_TYPES[name].matches(built.module) and is_layer_module(module) and is_layer_module(built.module)
    x = torch.randn(4, *shape)
    with torch.inference_mode():
        found, expected = built.module(x), module(x)
    assert tuple(found.shape[1:]) == built.out_shape
    torch.testing.assert_close(found, expected)


def test_save_model_writes_every_layer_type_and_leaves_out_identities(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(72, 8), nn.GELU(), nn.Tanh(), nn.Identity(), nn.Sigmoid(),
        nn.SiLU(), nn.Softplus(), nn.ELU(), nn.LeakyReLU(0.2), _trained(nn.BatchNorm1d(8)), nn.LayerNorm(8, elementwise_affine=False),
        nn.Softmax(dim=1), nn.Linear(8, 4),
    )
    decoder = nn.Sequential(nn.Linear(2, 72), nn.Unflatten(1, (2, 6, 6)), nn.Flatten(), Reshape((2, 6, 6)))
    expected = ["conv2d", "conv_transpose2d", "relu", "flatten", "linear", "gelu", "tanh", "sigmoid", "silu", "softplus",
                "elu", "leaky_relu", "batch_norm", "layer_norm", "softmax", "linear", "linear", "unflatten", "flatten", "unflatten"]
    assert set(expected) | {"log1p"} == set(LAYER_TYPES)  # every registered type is in this file (log1p: below)
    saved = save_model(tmp_path / "m.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                       input_shape=[2, 6, 6], latent_dim=2)
    assert [layer.type for layer in saved.layers] == expected
    assert [layer.type for layer in load_model(tmp_path / "m.safetensors").layers] == expected


class _OwnReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


class _OwnLinear(nn.Linear):
    pass


@pytest.mark.parametrize(
    ("module", "known"),
    [(nn.Dropout(), True), (nn.Identity(), True), (nn.ReLU(), True), (Linear(2, 2), True), (_OwnLinear(2, 2), True),
     (nn.BatchNorm1d(3), True), (nn.LayerNorm(3), True), (nn.MaxPool2d(2), False), (_OwnReLU(), False), (nn.Sequential(), False)],
    ids=["dropout", "identity", "relu", "vaeeval-linear", "linear-subclass", "batchnorm", "layernorm", "maxpool", "relu-subclass",
         "sequential"],
)
def test_is_layer_module(module, known):
    """Activations match by exact class (a subclass may compute something else); weighted layers by isinstance."""
    assert is_layer_module(module) is known


@pytest.mark.parametrize(
    ("module", "phrase"),
    [
        (nn.GroupNorm(2, 4), "format 1 has no such layer"),
        (nn.LayerNorm([2, 2]), "normalized_shape [2, 2]: format 1 normalizes the last axis"),
        (nn.Softmax(dim=0), "dim=0; format 1's softmax is over a point's features"),
        (nn.BatchNorm1d(4, track_running_stats=False), "without running statistics"),
        (nn.Conv2d(1, 1, 3, dilation=2), "dilation=1"),
        (nn.Conv2d(1, 1, 3, padding="same"), "give the padding as numbers"),
        (nn.GELU(approximate="tanh"), "exact one"),
        (nn.Softplus(beta=2), "beta 1"),
        (nn.Flatten(2), "every axis but the batch axis"),
    ],
)
def test_inexpressible_modules_are_named(tmp_path, module, phrase):
    encoder = nn.Sequential(nn.Linear(4, 4), module)
    with pytest.raises(VaeevalError) as error:
        save_model(tmp_path / "m.safetensors", encoder, nn.Sequential(nn.Linear(2, 4)),
                   likelihood={"family": "bernoulli"}, input_shape=[4], latent_dim=2)
    assert f"encoder.1 ({type(module).__name__})" in str(error.value) and phrase in str(error.value)
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------- traced calls (convert)

TRACED_FUNCTIONS = [
    (torch.relu, (), {}), (F.relu, (), {"inplace": False}),
    (F.gelu, (), {}), (F.gelu, (), {"approximate": "tanh"}),
    (torch.tanh, (), {}), (F.tanh, (), {}),
    (torch.sigmoid, (), {}), (F.sigmoid, (), {}),
    (F.silu, (), {}),
    (F.softplus, (), {}), (F.softplus, (), {"beta": 2.0, "threshold": 10.0}),
    (F.elu, (), {}), (F.elu, (), {"alpha": 0.5}),
    (F.leaky_relu, (), {}), (F.leaky_relu, (0.2,), {}), (F.leaky_relu, (), {"negative_slope": 0.3}),
    (torch.flatten, (1,), {}), (torch.flatten, (), {"start_dim": 1}), (torch.flatten, (2,), {}),
]
TRACED_METHODS = [("relu", ()), ("tanh", ()), ("sigmoid", ()), ("flatten", (1,)), ("flatten", (1, 2))]


def _call_id(target, args, kwargs) -> str:
    return f"{getattr(target, '__module__', '') or ''}.{target.__name__}{args}{kwargs}"


@pytest.mark.parametrize(("target", "args", "kwargs"), TRACED_FUNCTIONS, ids=[_call_id(*case) for case in TRACED_FUNCTIONS])
def test_traced_function_calls_become_modules_computing_the_same(target, args, kwargs):
    module = function_layer(target, args, kwargs)
    x = torch.randn(3, 2, 4, 4) * 3
    assert torch.equal(module(x), target(x, *args, **kwargs))


@pytest.mark.parametrize(("name", "args"), TRACED_METHODS)
def test_traced_method_calls_become_modules_computing_the_same(name, args):
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(method_layer(name, args)(x), getattr(x, name)(*args))


def test_log1p_calls_become_a_position_independent_log1p():
    """torch.log1p and x.log1p() are the log1p layer, computed through log so no element's value depends on its place."""
    x = torch.cat([torch.rand(500) * 1000, torch.rand(100) * 1e-6, torch.tensor([0.0, 1e-30, 3e38])])
    for module in (function_layer(torch.log1p, (), {}), method_layer("log1p", ())):
        assert layer_spec("net.0", module) == {"type": "log1p"}
        torch.testing.assert_close(module(x), torch.log1p(x), rtol=2.5e-7, atol=0)
        whole = module(x)
        assert all(torch.equal(module(x[start : start + 37]), whole[start : start + 37]) for start in range(0, 64))


def test_every_registered_call_is_tested_and_others_are_not_layers():
    tested = {target for target, _, _ in TRACED_FUNCTIONS} | {torch.log1p}
    assert {f for t in LAYER_TYPES.values() for f in t.functions} == tested
    assert {m for t in LAYER_TYPES.values() for m in t.methods} == {name for name, _ in TRACED_METHODS} | {"log1p"}
    assert function_layer(torch.add, (1.0,), {}) is None and function_layer(F.dropout, (), {}) is None
    assert method_layer("view", (-1,)) is None and method_layer("exp", ()) is None


def test_a_traced_call_format_1_cannot_hold_is_recognised_then_refused_by_name():
    module = function_layer(F.gelu, (), {"approximate": "tanh"})
    assert module.approximate == "tanh"
    with pytest.raises(VaeevalError, match=r"decode\.1 \(GELU\) cannot be expressed in format 1: approximate='tanh'"):
        layer_spec("decode.1", module)


@pytest.mark.parametrize(("target", "args"), [(F.softplus, (2.0,)), (F.elu, (0.5,))], ids=["softplus-beta", "elu-alpha"])
def test_positional_arguments_of_traced_calls_are_kept(target, args):
    x = torch.randn(3, 8) * 3
    assert torch.equal(function_layer(target, args, {})(x), target(x, *args))


def test_flatten_without_arguments_flattens_every_axis_like_torch():
    x = torch.randn(3, 2, 4)
    assert torch.equal(function_layer(torch.flatten, (), {})(x), torch.flatten(x))


# ---------------------------------------------------------------- Linear and its private torch operator


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layers_compute_nn_linear_and_each_row_alone(bias, monkeypatch):
    """A loaded linear layer: F.linear's numbers to float32 rounding, oneDNN or not, whatever rows come with a row."""
    torch.manual_seed(0)
    layer = Linear(400, 784, bias=bias).requires_grad_(False)
    x = torch.randn(3000, 400)
    expected = nn.functional.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.inference_mode():
        found = layer(x)
        torch.testing.assert_close(found.double(), expected, rtol=0, atol=1e-4)
        for rows in (1, 63, 64, 65, 1000):
            assert torch.equal(rows_independently(layer, x[:rows]), found[:rows])
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("error", [RuntimeError, TypeError])
def test_linear_falls_back_to_f_linear_for_good_when_the_private_operator_fails(monkeypatch, error):
    calls = []

    def changed_operator(*args):
        calls.append(args)
        raise error("a torch whose mkldnn._linear_pointwise changed")

    monkeypatch.setattr(linear_layers, "_ONEDNN_LINEAR", changed_operator)  # restored after the test
    torch.manual_seed(1)
    layer = Linear(30, 20).requires_grad_(False)
    x = torch.randn(100, 30)
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert len(calls) == 1 and linear_layers._ONEDNN_LINEAR is None
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert len(calls) == 1  # not tried again


def test_linear_runs_the_private_operator_on_float32_cpu_inference(monkeypatch):
    if linear_layers._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear operator")
    calls = []
    operator = linear_layers._ONEDNN_LINEAR
    monkeypatch.setattr(linear_layers, "_ONEDNN_LINEAR", lambda *args: calls.append(args) or operator(*args))
    layer = Linear(30, 20)
    x = torch.randn(100, 30)
    with torch.inference_mode():
        layer(x)
    assert len(calls) == 1
    layer(x.requires_grad_())  # gradients wanted: the operator has no autograd
    with torch.inference_mode():
        layer.double()(x.double())  # float64: nn.Linear
    assert len(calls) == 1


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@pytest.mark.parametrize("bias", [True, False])
def test_the_private_onednn_operator_exists_and_computes_f_linear(bias):
    """Pinned to torch.ops.mkldnn._linear_pointwise: a torch upgrade that drops or changes it fails here."""
    assert linear_layers._onednn_linear() is not None and linear_layers._ONEDNN_LINEAR is not None, (
        "torch.ops.mkldnn._linear_pointwise is gone: vaeeval.format.layers.Linear falls back to nn.Linear (slower)"
    )
    torch.manual_seed(2)
    x, weight = torch.randn(257, 400), torch.randn(784, 400) / 20
    b = torch.randn(784) if bias else None
    with torch.inference_mode():
        found = linear_layers._ONEDNN_LINEAR(x, weight, b, "none", [], "")
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert found.dtype == torch.float32 and found.shape == expected.shape
    torch.testing.assert_close(found.double(), expected, rtol=0, atol=1e-4)
