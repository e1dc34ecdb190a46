"""save_model: torch modules written as a format-1 file, checked to load back to the same numbers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vaeeval.errors import SpecError, VaeevalError
from vaeeval.format.layers import layer_spec
from vaeeval.format.model import FORMAT_VERSION, METADATA_KEY, Model
from vaeeval.format.reading import build_model, load_model
from vaeeval.io.files import staged, writing


def save_model(
    path: str | Path,
    encoder: nn.Sequential,
    decoder: nn.Sequential,
    *,
    likelihood: Mapping[str, Any],
    input_shape: Sequence[int],
    latent_dim: int,
    prior: Mapping[str, Any] | None = None,
    posterior: Mapping[str, Any] | None = None,
    hierarchy: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> Model:
    """Write a format-1 model file from ``nn.Sequential`` encoder and decoder.

    Tensors are named as ``state_dict()`` names them under the prefixes
    ``encoder.`` and ``decoder.``. A tensor given as a value in ``likelihood`` or
    ``prior`` (e.g. ``{"family": "gaussian", "log_sigma": tensor}``) is stored as
    ``likelihood.<key>`` / ``prior.<key>``. ``posterior`` is the optional block (``{"family":
    "categorical"}`` for a discrete latent: the encoder then gives its logits, and the prior
    defaults to the uniform one of that family). ``hierarchy`` adds a second latent group:
    ``{"latent_dim": d2, "encoder": nn.Sequential (z1 -> [2 d2]), "prior": nn.Sequential
    (z2 -> [2 latent_dim])}``; ``prior`` is then p(z2). Dropout and Identity are left out
    (they are identities at evaluation time).

    The file is read back with ``load_model`` and both networks are checked to
    give the same outputs as the modules passed in.

    Returns:
        The model as ``load_model(path)`` reads it.

    Raises:
        VaeevalError: a module format 1 cannot express, or a document that does not validate.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    document: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "input_shape": [int(s) for s in input_shape],
        "latent_dim": int(latent_dim),
        "encoder": _sequential_specs(encoder, "encoder", tensors),
        "decoder": _sequential_specs(decoder, "decoder", tensors),
        "likelihood": _store_tensor_values(likelihood, "likelihood", tensors),
    }
    if posterior is not None:
        document["posterior"] = dict(posterior)
    if hierarchy is not None:
        document["hierarchy"] = {
            "latent_dim": int(hierarchy["latent_dim"]),
            "encoder": _sequential_specs(hierarchy["encoder"], "hierarchy.encoder", tensors),
            "prior": _sequential_specs(hierarchy["prior"], "hierarchy.prior", tensors),
        }
    if prior is not None or posterior is None or posterior.get("family", "gaussian") == "gaussian":
        document["prior"] = _store_tensor_values(prior or {"family": "standard_normal"}, "prior", tensors)
    if data is not None:
        document["data"] = dict(data)
    if description:
        document["description"] = description
    try:
        build_model(document, tensors, path)
    except SpecError as error:
        raise VaeevalError(f"cannot save {path}: {error}") from None
    with writing(path, "model"), staged(path) as temporary:
        save_file(
            {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()},
            str(temporary),
            metadata={METADATA_KEY: json.dumps(document)},
        )
        model = replace(load_model(temporary), path=path)
        _check_reproduces(encoder, model.encoder, document["input_shape"], "encoder", path)
        _check_reproduces(decoder, model.decoder, [model.latent_dim], "decoder", path)
    return model


def _store_tensor_values(spec: Mapping[str, Any], prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    stored = {}
    for key, value in spec.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}.{key}"] = value
            value = f"{prefix}.{key}"
        stored[key] = value
    return stored


def _leaves(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}.{name}")
    else:
        yield prefix, module


def _sequential_specs(net: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    if not isinstance(net, nn.Sequential):
        raise VaeevalError(f"{prefix}: save_model takes an nn.Sequential, found {type(net).__name__}")
    specs = []
    for name, module in _leaves(net, prefix):
        spec = layer_spec(name, module)
        if spec is None:
            continue
        if "tensor" in spec:
            for key, value in module.state_dict().items():
                if value.is_floating_point():  # a batch norm's num_batches_tracked is no weight
                    tensors[f"{name}.{key}"] = value
        specs.append(spec)
    return specs


def _check_reproduces(original: nn.Module, loaded: nn.Module, in_shape: list[int], part: str, path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, *in_shape, generator=generator)
    was_training = original.training
    try:
        original.eval()
        with torch.inference_mode():
            expected = original(x.to(next(original.parameters(), x).device)).float().cpu()
            found = loaded(x)
    finally:
        original.train(was_training)
    if expected.shape != found.shape or not torch.allclose(expected, found, rtol=1e-4, atol=1e-5):
        raise VaeevalError(f"{path}: the saved {part} does not reproduce the module's output; not saved as format 1")
