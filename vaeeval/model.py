"""Format 1 (FORMAT.md): read and validate a model file, build torch modules; write one.

``load_model`` checks the whole file before anything is computed: the
safetensors container, the ``vaeeval`` document, every layer's tensors and the
shapes along both chains, the likelihood's and prior's tensors, and that no
tensor is left unused. Nothing from the file is executed or unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vaeeval.domains import Domain, domain_from_spec
from vaeeval.errors import ModelFileError, SpecError, VaeevalError, listing
from vaeeval.files import file_digest, load_json, reading, regular_file, staged, writing
from vaeeval.layers import Shape, build_layer, describe, format_shape, layer_spec
from vaeeval.likelihoods import Likelihood, likelihood_from_spec
from vaeeval.priors import Prior, prior_from_spec
from vaeeval.specs import is_integer

FORMAT_VERSION = 1
METADATA_KEY = "vaeeval"
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit

# BLAS takes another code path, which rounds differently, for a handful of rows.
# Padding every network call to at least this many rows keeps each point's
# numbers independent of the batch it was evaluated in.
MIN_ROWS = 64


@dataclass(frozen=True)
class LayerInfo:
    """One layer as ``vaeeval inspect`` shows it."""

    part: str
    index: int
    type: str
    detail: str
    out_shape: Shape
    parameters: int


@dataclass(frozen=True)
class Model:
    """A loaded, validated VAE: encoder q(z|x), decoder, likelihood p(x|z) and prior p(z)."""

    encoder: nn.Sequential
    decoder: nn.Sequential
    likelihood: Likelihood
    prior: Prior
    input_shape: Shape
    latent_dim: int
    domain: Domain | None = None
    description: str = ""
    layers: tuple[LayerInfo, ...] = ()
    path: Path | None = None
    digest: str | None = None  # of the file read: the model, or the weights of an --arch model
    arch: str | None = None  # the class an --arch model was read through (None: format 1)
    extra_parameters: int = 0  # likelihood and prior tensors
    decoder_width: int = 0  # the widest decoder activation per sample, for memory budgets
    general: bool = False  # evaluated through torch distributions (protocol.ArchModel), not format 1's fast path
    notes: tuple[str, ...] = ()  # what the output must say about how the model was read (an assumed prior, a warning)

    @property
    def data_dims(self) -> int:
        """D, the number of dimensions of one data point."""
        return math.prod(self.input_shape)

    @property
    def decode_shape(self) -> Shape:
        """``(P, *input_shape)``: the decoder's output per latent vector, as the likelihood reads it."""
        return (self.likelihood.params_per_dim, *self.input_shape)

    @property
    def parameter_count(self) -> int:
        """Number of weights in the encoder, decoder, likelihood and prior."""
        return sum(layer.parameters for layer in self.layers) + self.extra_parameters

    def to(self, device: torch.device | str) -> Model:
        """The same model with its tensors on ``device``."""
        return replace(
            self,
            encoder=self.encoder.to(device),
            decoder=self.decoder.to(device),
            likelihood=self.likelihood.to(device),
            prior=self.prior.to(device),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) parameters: ``x [B, *input_shape]`` -> ``(mean, log_var)``, each ``[B, latent_dim]``."""
        out = _run(self.encoder, x).reshape(x.shape[0], 2 * self.latent_dim)
        return out[:, : self.latent_dim], out[:, self.latent_dim :]

    def linear_head(self) -> tuple[nn.Module, nn.Linear] | None:
        """(everything before, the last layer) when the decoder ends in a linear layer, else None."""
        if isinstance(self.decoder, nn.Sequential) and isinstance(self.decoder[-1], nn.Linear):
            return self.decoder[:-1], self.decoder[-1]
        return None

    def decode_through_head(self, z: torch.Tensor, trunk: nn.Module, head: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's last linear layer's input ``[B, H]`` and output ``[B, P*D]`` (see ``linear_head``)."""
        hidden = _run(trunk, z) if len(trunk) else z
        return hidden, _run(head, hidden)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters: ``z [B, latent_dim]`` -> ``[B, P, *input_shape]``."""
        return _run(self.decoder, z).reshape(z.shape[0], *self.decode_shape)


def rows_independently(net: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``net(x)`` (a tensor or a tuple of them), each row's result independent of how many rows came with it."""
    rows = x.shape[0]
    if rows >= MIN_ROWS:
        return net(x)
    result = net(torch.cat([x, x.new_zeros((MIN_ROWS - rows, *x.shape[1:]))]))
    return tuple(part[:rows] for part in result) if isinstance(result, tuple) else result[:rows]


_run = rows_independently


# ---------------------------------------------------------------- reading


def load_model(path: str | Path) -> Model:
    """Read and validate a format-1 model file.

    Args:
        path: a ``.safetensors`` file whose ``__metadata__`` has a ``vaeeval`` document.

    Returns:
        The model, on the CPU, in float32.

    Raises:
        ModelFileError: the file is missing, unreadable, not safetensors, truncated,
            or breaks format 1; the message names the file and the problem.
    """
    path = Path(path)
    header = _read_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFileError(path, "not a safetensors file (its __metadata__ is not a map of strings)")
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            path,
            "a safetensors file without vaeeval metadata (no \"vaeeval\" key in __metadata__); "
            "it holds weights but not how they make a VAE — see FORMAT.md, or use --arch (later versions)",
        )
    try:
        document = load_json(metadata[METADATA_KEY], "the vaeeval document")
    except json.JSONDecodeError as error:
        raise ModelFileError(path, f"the vaeeval metadata is not valid JSON ({error})") from None
    except ValueError as error:
        raise ModelFileError(path, str(error)) from None
    if not isinstance(document, dict):
        raise ModelFileError(path, "the vaeeval metadata must be a JSON object")
    _check_version(path, document)
    tensors = _read_tensors(path)
    try:
        model = _build(document, tensors, path)
    except SpecError as error:
        raise ModelFileError(path, str(error)) from None
    return replace(model, digest=file_digest(path))


def _read_header(path: Path) -> dict[str, Any]:
    size = regular_file(path, ModelFileError, "model file").st_size
    with reading(path, ModelFileError, "model file"), path.open("rb") as handle:
        start = handle.read(9)
        length = int.from_bytes(start[:8], "little")
        if len(start) < 9 or start[8:9] != b"{" or length > _MAX_HEADER_BYTES:
            raise ModelFileError(path, _not_safetensors(start, size))
        if 8 + length > size:
            raise ModelFileError(path, f"truncated: the header says {length} bytes, only {size - 8} follow the length")
        raw = start[8:] + handle.read(length - 1)
    try:
        header = load_json(raw, "its header")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelFileError(path, "not a safetensors file (its header is not JSON)") from None
    except ValueError as error:
        raise ModelFileError(path, f"not a safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - length
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__"
        and isinstance(entry, dict)
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and isinstance(entry["data_offsets"][1], int)
    ]
    if ends and max(ends) > data_bytes:
        raise ModelFileError(
            path, f"truncated: its tensors need {max(ends)} bytes of data, the file has {data_bytes}"
        )
    return header


def _not_safetensors(start: bytes, size: int) -> str:
    """Why a file that does not open like safetensors (8-byte length, then '{') is refused."""
    never = "vaeeval never unpickles files — save the weights with safetensors.torch.save_file"
    if start.startswith(b"PK"):
        return f"a zip archive (a PyTorch .pt/.pth checkpoint?), not a safetensors file; {never}"
    if start.startswith(b"\x80"):
        return f"a Python pickle (a PyTorch checkpoint?), not a safetensors file; {never}"
    if start.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array, not a safetensors model file (MODEL comes before DATA)"
    if size < 9:
        return f"not a safetensors file (only {size} bytes)"
    return "not a safetensors file (no JSON header after the 8-byte length)"


def _check_version(path: Path, document: Mapping[str, Any]) -> None:
    version = document.get("format")
    if version is None:
        raise ModelFileError(path, "the vaeeval document has no \"format\" key (format 1 files have \"format\": 1)")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ModelFileError(
            path, f"format {version!r} is not supported; this vaeeval reads format {FORMAT_VERSION}"
        )


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and the tensors of a safetensors file, checked as a container; nothing is unpickled.

    Raises:
        ModelFileError: missing, unreadable, not safetensors, or truncated.
    """
    path = Path(path)
    header = _read_header(path)
    tensors = _load_tensors(path)
    _check_finite(path, {name: t for name, t in tensors.items() if t.is_floating_point()})
    return header, tensors


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelFileError(path, f"not a readable safetensors file ({reason})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = _load_tensors(path)
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ModelFileError(path, f"tensor {name!r} is {dtype}; format 1 weights are floating point")
    converted = {name: tensor.to(torch.float32) for name, tensor in tensors.items()}
    _check_finite(path, converted)
    return converted


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        bad = int((~tensor.isfinite()).sum())
        if bad:
            raise ModelFileError(path, f"tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity); a trained model has none")


def _positive_int(document: Mapping[str, Any], key: str) -> int:
    value = document.get(key)
    if not is_integer(value, 1):
        raise SpecError(f"\"{key}\" must be a positive integer, found {value!r}")
    return value


_MAX_DIMS = 1 << 26  # values per data point: a 8192 x 8192 image
_MAX_ACTIVATION = 1 << 28  # values per point out of any one layer


def _input_shape(document: Mapping[str, Any]) -> Shape:
    value = document.get("input_shape")
    if not isinstance(value, list) or not value or not all(is_integer(s, 1) for s in value):
        raise SpecError(f"\"input_shape\" must be a non-empty list of positive integers, found {value!r}")
    if math.prod(value) > _MAX_DIMS:
        raise SpecError(f"\"input_shape\" {value} holds {math.prod(value):,} values per point; at most {_MAX_DIMS:,} are read")
    return tuple(value)


def _build_chain(
    part: str, specs: Any, tensors: Mapping[str, torch.Tensor], in_shape: Shape
) -> tuple[nn.Sequential, list[LayerInfo], set[str]]:
    if not isinstance(specs, list) or not specs:
        raise SpecError(f"\"{part}\" must be a non-empty list of layers, found {specs!r}")
    modules, infos, used = [], [], set()
    shape = in_shape
    for index, spec in enumerate(specs):
        label = f"{part} layer {index} ({describe(spec) if isinstance(spec, Mapping) else repr(spec)})"
        built = build_layer(spec, tensors, shape, label)
        if math.prod(built.out_shape) > _MAX_ACTIVATION:
            raise SpecError(f"{label}: gives {format_shape(built.out_shape)} per point, more than {_MAX_ACTIVATION:,} values")
        params = sum(tensors[name].numel() for name in built.tensors)
        detail = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "type")
        infos.append(LayerInfo(part, index, spec["type"], detail, built.out_shape, params))
        modules.append(built.module)
        used.update(built.tensors)
        shape = built.out_shape
    return nn.Sequential(*modules).eval(), infos, used


def _build(document: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: Path | None) -> Model:
    input_shape = _input_shape(document)
    latent_dim = _positive_int(document, "latent_dim")
    likelihood = likelihood_from_spec(document.get("likelihood"), tensors, input_shape)
    prior = prior_from_spec(document.get("prior"), tensors, latent_dim)
    domain = domain_from_spec(document.get("data"))

    encoder, encoder_infos, encoder_used = _build_chain("encoder", document.get("encoder"), tensors, input_shape)
    encoder_out = encoder_infos[-1].out_shape
    if encoder_out != (2 * latent_dim,):
        raise SpecError(
            f"the encoder gives {format_shape(encoder_out)} per point; with latent_dim {latent_dim} "
            f"it must give [{2 * latent_dim}] (mean, then log-variance)"
        )
    decoder, decoder_infos, decoder_used = _build_chain("decoder", document.get("decoder"), tensors, (latent_dim,))
    decoder_out = decoder_infos[-1].out_shape
    expected = likelihood.params_per_dim * math.prod(input_shape)
    if math.prod(decoder_out) != expected:
        raise SpecError(
            f"the decoder gives {format_shape(decoder_out)} ({math.prod(decoder_out)} values) per point; "
            f"the {likelihood.family} likelihood needs P x D = {likelihood.params_per_dim} x "
            f"{math.prod(input_shape)} = {expected}"
        )

    _dry_run(encoder, input_shape, encoder_out, "encoder")
    _dry_run(decoder, (latent_dim,), decoder_out, "decoder")

    own = set(likelihood.tensors) | set(prior.tensors)
    unused = sorted(set(tensors) - encoder_used - decoder_used - own)
    if unused:
        shown = listing([repr(name) for name in unused])
        raise SpecError(f"{len(unused)} tensor(s) not used by any layer, likelihood or prior: {shown}")
    description = document.get("description", "")
    return Model(
        encoder=encoder,
        decoder=decoder,
        likelihood=likelihood,
        prior=prior,
        input_shape=input_shape,
        latent_dim=latent_dim,
        domain=domain,
        description=description if isinstance(description, str) else str(description),
        layers=tuple(encoder_infos + decoder_infos),
        path=path,
        extra_parameters=sum(tensors[name].numel() for name in own),
        decoder_width=max(math.prod(info.out_shape) for info in decoder_infos),
    )


def _dry_run(net: nn.Sequential, in_shape: Shape, expected: Shape, part: str) -> None:
    """One zero input through ``net``: torch must agree with the shapes inferred layer by layer."""
    try:
        with torch.inference_mode():
            found = tuple(net(torch.zeros(1, *in_shape)).shape[1:])
    except RuntimeError as error:
        raise SpecError(f"the {part} fails on a [1, {', '.join(map(str, in_shape))}] input: {error}") from None
    if found != expected:
        raise SpecError(f"the {part} gives {format_shape(found)}, not the {format_shape(expected)} its layers declare")


# ---------------------------------------------------------------- writing

def save_model(
    path: str | Path,
    encoder: nn.Sequential,
    decoder: nn.Sequential,
    *,
    likelihood: Mapping[str, Any],
    input_shape: Sequence[int],
    latent_dim: int,
    prior: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> Model:
    """Write a format-1 model file from ``nn.Sequential`` encoder and decoder.

    Tensors are named as ``state_dict()`` names them under the prefixes
    ``encoder.`` and ``decoder.``. A tensor given as a value in ``likelihood`` or
    ``prior`` (e.g. ``{"family": "gaussian", "log_sigma": tensor}``) is stored as
    ``likelihood.<key>`` / ``prior.<key>``. Dropout and Identity are left out
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
        "prior": _store_tensor_values(prior or {"family": "standard_normal"}, "prior", tensors),
    }
    if data is not None:
        document["data"] = dict(data)
    if description:
        document["description"] = description
    try:
        _build(document, tensors, path)
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
