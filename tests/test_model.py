"""Format 1: save_model and load_model round-trip, and what cannot be expressed is refused."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from vaeeval import VaeevalError, load_model, save_model

ACTIVATIONS = [nn.ReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, lambda: nn.LeakyReLU(0.3)]


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=0, max_size=3),
    activation=st.sampled_from(ACTIVATIONS),
    bias=st.booleans(),
    latent=st.integers(1, 4),
    dims=st.integers(1, 9),
)
def test_mlp_round_trip(tmp_path_factory, widths, activation, bias, latent, dims):
    path = tmp_path_factory.mktemp("rt") / "m.safetensors"

    def mlp(sizes):
        layers = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
            layers.append(nn.Linear(a, b, bias=bias))
            if i < len(sizes) - 2:
                layers.append(activation())
        return nn.Sequential(*layers)

    encoder, decoder = mlp([dims, *widths, 2 * latent]), mlp([latent, *widths, dims])
    model = save_model(path, encoder, decoder, likelihood={"family": "bernoulli"}, input_shape=[dims], latent_dim=latent)
    again = load_model(path)
    x, z = torch.randn(5, dims), torch.randn(5, latent)
    with torch.no_grad():
        # the same weights, but BLAS may round differently for differently aligned copies
        torch.testing.assert_close(again.encoder(x), encoder(x))
        torch.testing.assert_close(again.decoder(z), decoder(z))
        mean, log_var = again.encode(x)
        # encode() pads to 64 rows (batch-independent rounding): equal up to BLAS rounding
        torch.testing.assert_close(torch.cat([mean, log_var], 1), encoder(x))
    assert [layer.type for layer in again.layers] == [layer.type for layer in model.layers]


def test_document_names_tensors_like_state_dict(tmp_path):
    encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 4))
    decoder = nn.Sequential(nn.Sequential(nn.Linear(2, 8), nn.Tanh()), nn.Linear(8, 4))
    log_sigma = torch.full((4,), -1.0)
    save_model(tmp_path / "m.safetensors", encoder, decoder, likelihood={"family": "gaussian", "log_sigma": log_sigma},
               input_shape=[4], latent_dim=2, data={"domain": "real"}, description="test")
    with safe_open(tmp_path / "m.safetensors", "pt") as handle:
        document = json.loads(handle.metadata()["vaeeval"])
        names = set(handle.keys())
    assert document["format"] == 1 and document["description"] == "test"
    assert [layer.get("tensor") for layer in document["encoder"]] == ["encoder.0", None, "encoder.3"]
    assert document["decoder"][0] == {"type": "linear", "tensor": "decoder.0.0"}
    assert document["likelihood"] == {"family": "gaussian", "log_sigma": "likelihood.log_sigma"}
    layers = ("encoder.0", "encoder.3", "decoder.0.0", "decoder.1")
    assert names == {f"{p}.{k}" for p in layers for k in ("weight", "bias")} | {"likelihood.log_sigma"}
    model = load_model(tmp_path / "m.safetensors")
    assert model.domain.kind == "real" and model.likelihood.params_per_dim == 1
    assert model.parameter_count == sum(p.numel() for p in [*encoder.parameters(), *decoder.parameters()]) + 4


def test_save_refuses_wrong_output_sizes(tmp_path):
    with pytest.raises(VaeevalError, match=r"the encoder gives \[6\] per point; with latent_dim 2 it must give \[4\]"):
        save_model(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(4, 6)), nn.Sequential(nn.Linear(2, 4)),
                   likelihood={"family": "bernoulli"}, input_shape=[4], latent_dim=2)
    with pytest.raises(VaeevalError, match=r"needs P x D = 2 x 4 = 8"):
        save_model(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.Linear(2, 4)),
                   likelihood={"family": "gaussian"}, input_shape=[4], latent_dim=2)
