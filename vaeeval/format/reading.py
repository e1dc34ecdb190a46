"""load_model: a format-1 file read as data (never unpickled), validated as a whole, built into torch modules.

It checks the whole file before anything is computed: the safetensors container, the
``vaeeval`` document, every layer's tensors and the shapes along both chains, the
likelihood's and prior's tensors, and that no tensor is left unused.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vaeeval.errors import ModelFileError, SpecError, listing
from vaeeval.format.domains import domain_from_spec
from vaeeval.format.layers import Chain, Shape, build_layer, describe, format_shape
from vaeeval.format.library import LATENT, OBSERVED, Library
from vaeeval.format.likelihoods import Likelihood, likelihood_from_spec
from vaeeval.format.likelihoods.counts import COUNT_FAMILIES
from vaeeval.format.model import FORMAT_VERSION, METADATA_KEY, Covariate, Hierarchy, LayerInfo, Model
from vaeeval.format.priors import DISCRETE_LATENTS, Prior, StandardNormalPrior, prior_from_spec
from vaeeval.format.specs import is_integer, named_tensor
from vaeeval.io.files import file_digest, load_json, reading, regular_file

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


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
        model = build_model(document, tensors, path)
    except SpecError as error:
        raise ModelFileError(path, str(error)) from None
    return replace(model, digest=file_digest(path))


def _read_header(path: Path) -> dict[str, Any]:
    size = regular_file(path, ModelFileError, "model file").st_size
    with reading(path, ModelFileError, "model file"), path.open("rb") as handle:
        start = handle.read(9)
        length = int.from_bytes(start[:8], "little")
        if len(start) < 9 or start[8:9] != b"{" or length > _MAX_HEADER_BYTES:
            raise ModelFileError(path, _not_safetensors(start, size, path))
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


def _not_safetensors(start: bytes, size: int, path: Path) -> str:
    """Why a file that does not open like safetensors (8-byte length, then '{') is refused."""
    never = ("vaeeval never unpickles files; get the weights out with torch's weights-only loader: "
             f"vaeeval convert --from lightning {shlex.quote(str(path))} --arch FILE.py:CLASS --state-dict -o weights.safetensors")
    if start.startswith(b"PK"):
        return f"a zip archive (a PyTorch .pt/.pth/.ckpt checkpoint?), not a safetensors file; {never}"
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


def _positive_int(document: Mapping[str, Any], key: str, where: str = "") -> int:
    value = document.get(key)
    if not is_integer(value, 1):
        raise SpecError(f"{where}\"{key}\" must be a positive integer, found {value!r}")
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
    part: str, specs: Any, tensors: Mapping[str, torch.Tensor], in_shape: Shape, covariates: Mapping[str, int] | None = None
) -> tuple[Chain, list[LayerInfo], set[str]]:
    if not isinstance(specs, list) or not specs:
        raise SpecError(f"\"{part}\" must be a non-empty list of layers, found {specs!r}")
    modules, infos, used = [], [], set()
    shape = in_shape
    for index, spec in enumerate(specs):
        label = f"{part} layer {index} ({describe(spec) if isinstance(spec, Mapping) else repr(spec)})"
        built = build_layer(spec, tensors, shape, label, covariates)
        if math.prod(built.out_shape) > _MAX_ACTIVATION:
            raise SpecError(f"{label}: gives {format_shape(built.out_shape)} per point, more than {_MAX_ACTIVATION:,} values")
        params = sum(tensors[name].numel() for name in built.tensors)
        detail = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "type")
        infos.append(LayerInfo(part, index, spec["type"], detail, built.out_shape, params))
        modules.append(built.module)
        used.update(built.tensors)
        shape = built.out_shape
    return Chain(*modules).eval(), infos, used


def build_model(document: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], path: Path | None) -> Model:
    input_shape = _input_shape(document)
    latent_dim = _positive_int(document, "latent_dim")
    likelihood = likelihood_from_spec(document.get("likelihood"), tensors, input_shape)
    posterior, floor = _posterior(document.get("posterior"))
    top = document.get("hierarchy")
    top_dim = _positive_int(top, "latent_dim", "hierarchy: ") if isinstance(top, Mapping) else None
    prior = _prior(document.get("prior"), posterior, tensors, top_dim or latent_dim)
    domain = domain_from_spec(document.get("data"))
    covariates = _covariates(document.get("covariates"))
    widths = {c.name: c.width for c in covariates}

    encoder, encoder_infos, encoder_used = _build_chain("encoder", document.get("encoder"), tensors, input_shape, widths)
    encoder_out = encoder_infos[-1].out_shape
    if posterior == GAUSSIAN_POSTERIOR and encoder_out != (2 * latent_dim,):
        raise SpecError(
            f"the encoder gives {format_shape(encoder_out)} per point; with latent_dim {latent_dim} "
            f"it must give [{2 * latent_dim}] (mean, then log-variance)"
        )
    if posterior != GAUSSIAN_POSTERIOR and encoder_out != (latent_dim,):
        raise SpecError(
            f"the encoder gives {format_shape(encoder_out)} per point; a {posterior} posterior with latent_dim {latent_dim} "
            f"needs [{latent_dim}] logits"
        )
    decoder, decoder_infos, decoder_used = _build_chain("decoder", document.get("decoder"), tensors, (latent_dim,), widths)
    decoder_out = decoder_infos[-1].out_shape
    expected = likelihood.params_per_dim * math.prod(input_shape)
    if math.prod(decoder_out) != expected:
        raise SpecError(
            f"the decoder gives {format_shape(decoder_out)} ({math.prod(decoder_out)} values) per point; "
            f"the {likelihood.family} likelihood needs P x D = {likelihood.params_per_dim} x "
            f"{math.prod(input_shape)} = {expected}"
        )
    library, library_infos, library_used = _library(document.get("library"), tensors, input_shape, likelihood, covariates)
    hierarchy, hierarchy_infos, hierarchy_used = _hierarchy(top, top_dim, tensors, latent_dim)
    if hierarchy is not None and (posterior != GAUSSIAN_POSTERIOR or library is not None or covariates):
        raise SpecError("hierarchy: a second latent group goes with a Gaussian posterior, without a library size or covariates")
    latent_library = library is not None and library.latent
    chains = {"encoder": (encoder, input_shape, encoder_out), "decoder": (decoder, (latent_dim,), decoder_out)}
    if latent_library:
        chains["library encoder"] = (library.encoder, input_shape, (2,))
    for part, (chain, in_shape, out_shape) in chains.items():
        _dry_run(chain, in_shape, out_shape, part, widths)
    if latent_library and not isinstance(prior, StandardNormalPrior):
        raise SpecError("a latent library size needs the standard_normal prior for z (its own prior is in \"library\")")

    own = set(likelihood.tensors) | set(prior.tensors)
    unused = sorted(set(tensors) - encoder_used - decoder_used - library_used - hierarchy_used - own)
    if unused:
        shown = listing([repr(name) for name in unused])
        raise SpecError(f"{len(unused)} tensor(s) not used by any layer, likelihood or prior: {shown}")
    description = document.get("description", "")
    calibration = _calibration(document.get("calibration"))
    infos = encoder_infos + decoder_infos + library_infos + hierarchy_infos
    return Model(
        encoder=encoder,
        decoder=decoder,
        likelihood=likelihood,
        prior=prior_from_spec(None, tensors, latent_dim + 1) if latent_library else prior,
        input_shape=input_shape,
        latent_dim=latent_dim + latent_library,
        domain=domain,
        description=description if isinstance(description, str) else str(description),
        layers=tuple(infos),
        path=path,
        extra_parameters=sum(tensors[name].numel() for name in own) + (2 * library.mean.numel() if latent_library else 0),
        decoder_width=max(math.prod(info.out_shape) for info in decoder_infos),
        data_layer=_data_layer(document.get("data")),
        categories={c.name: c.categories for c in covariates if c.categories is not None},
        covariates=tuple(c.name for c in covariates),
        covariate_sizes={c.name: c.width for c in covariates if c.categories is None},
        library=library,
        variance_floor=floor,
        posterior_family=posterior,
        hierarchy=hierarchy,
        notes=(*(() if library is None else (f"library size {library.describe()}",)), *_calibration_notes(calibration)),
        calibration=calibration,
    )


def _calibration(spec: Any) -> dict[str, Any] | None:
    """The optional ``calibration`` record (docs/FORMAT.md): how ``vaeeval calibrate`` fitted the scale."""
    if spec is None:
        return None
    data = spec.get("data") if isinstance(spec, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("digest"), str) or not isinstance(data.get("n"), int):
        raise SpecError("calibration: not a record of the data a scale was fitted on (data.digest, data.n)")
    domain_from_spec(data.get("domain"))  # the calibration data's domain, where recorded: bounds the data to evaluate
    return dict(spec)


def _calibration_notes(calibration: Mapping[str, Any] | None) -> tuple[str, ...]:
    if calibration is None:
        return ()
    data = calibration["data"]
    what = "per-dimension scales" if calibration.get("per_dimension") else "scale"
    return (f"likelihood {what} fitted by vaeeval calibrate on {data.get('path') or 'data'} "
            f"({data['n']} points, {data['digest'][:19]}) by the {calibration.get('criterion', 'elbo')}",)


def _covariates(spec: Any) -> list[Covariate]:
    if spec is None:
        return []
    if not isinstance(spec, list):
        raise SpecError(f"\"covariates\" must be a list of objects with a \"name\", found {spec!r}")
    found: list[Covariate] = []
    for index, entry in enumerate(spec):
        where = f"covariates[{index}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise SpecError(f"{where} must be an object with a non-empty string \"name\", found {entry!r}")
        unknown = sorted(set(entry) - {"name", "categories", "size"})
        if unknown:
            raise SpecError(f"{where} ({entry['name']}): unknown key(s) {', '.join(unknown)}")
        if any(c.name == entry["name"] for c in found):
            raise SpecError(f"{where}: covariate {entry['name']!r} is declared twice")
        categories = entry.get("categories")
        if "categories" in entry and "size" in entry:
            raise SpecError(f"{where} ({entry['name']}): give categories (categorical) or size (continuous), not both")
        if categories is not None:
            if not isinstance(categories, list) or not categories or len(categories) > 1 << 20 or not all(
                isinstance(c, str) for c in categories
            ) or len(set(categories)) != len(categories):
                raise SpecError(f"{where} ({entry['name']}): categories must be a non-empty list of distinct strings")
            found.append(Covariate(entry["name"], tuple(categories)))
            continue
        size = entry.get("size", 1)
        if not is_integer(size, 1, 1 << 20):
            raise SpecError(f"{where} ({entry['name']}): size must be a positive integer, found {size!r}")
        found.append(Covariate(entry["name"], None, size))
    return found


GAUSSIAN_POSTERIOR = "gaussian"


def _posterior(spec: Any) -> tuple[str, float]:
    """The ``posterior`` block: q(z|x)'s family (a diagonal Gaussian, or a discrete latent) and its variance floor."""
    if spec is None:
        return GAUSSIAN_POSTERIOR, 0.0
    families = (GAUSSIAN_POSTERIOR, *DISCRETE_LATENTS)
    family = spec.get("family", GAUSSIAN_POSTERIOR) if isinstance(spec, Mapping) else None
    if family not in families:
        raise SpecError(f"posterior: family must be one of {', '.join(families)}, found {spec!r}")
    keys = {"family", "variance_floor"} if family == GAUSSIAN_POSTERIOR else {"family"}
    if set(spec) - keys:
        raise SpecError(f"\"posterior\" of family {family} takes {', '.join(sorted(keys))}, found {spec!r}")
    return family, _variance_floor(spec)


def _prior(spec: Any, posterior: str, tensors: Mapping[str, torch.Tensor], latent_dim: int) -> Prior:
    """p(z): a discrete latent's prior is of its posterior's family (uniform when the file gives none)."""
    if spec is None and posterior != GAUSSIAN_POSTERIOR:
        spec = {"family": posterior}
    prior = prior_from_spec(spec, tensors, latent_dim)
    if prior.discrete != (posterior != GAUSSIAN_POSTERIOR) or (prior.discrete and prior.family != posterior):
        raise SpecError(f"prior: a {prior.family} prior cannot go with a {posterior} posterior; a discrete latent's prior "
                        "is of its posterior's family, a Gaussian posterior's a continuous one")
    return prior


def _variance_floor(spec: Mapping[str, Any]) -> float:
    floor = spec.get("variance_floor", 0.0)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < math.inf:
        raise SpecError(f"posterior: variance_floor must be a non-negative number, found {floor!r}")
    return float(floor)


def _data_layer(spec: Any) -> str | None:
    layer = spec.get("layer") if isinstance(spec, Mapping) else None
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise SpecError(f"data: layer must be the name of an AnnData layer, found {layer!r}")
    return layer


def _library(
    spec: Any, tensors: Mapping[str, torch.Tensor], input_shape: Shape, likelihood: Likelihood, covariates: list[Covariate]
) -> tuple[Library | None, list[LayerInfo], set[str]]:
    """The document's ``library`` block, checked: the library, its encoder's layers, and the tensors it reads."""
    if spec is None:
        return None, [], set()
    kind = spec.get("type") if isinstance(spec, Mapping) else None
    if kind not in (OBSERVED, LATENT):
        raise SpecError(f"library must be {{\"type\": \"observed\"}} or {{\"type\": \"latent\", ...}}, found {spec!r}")
    if likelihood.family not in COUNT_FAMILIES:
        raise SpecError(f"library: a library size scales the mean of a count family ({', '.join(COUNT_FAMILIES)}), not {likelihood.family}")
    allowed = {"type"} if kind == OBSERVED else {"type", "encoder", "mean", "log_var", "covariate"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"library: unknown key(s) {', '.join(unknown)} for type {kind!r}")
    if kind == OBSERVED:
        likelihood.observed_library = True
        return Library(OBSERVED), [], set()
    widths = {c.name: c.width for c in covariates}
    encoder, infos, used = _build_chain("library encoder", spec.get("encoder"), tensors, input_shape, widths)
    if infos[-1].out_shape != (2,):
        raise SpecError(
            f"the library encoder gives {format_shape(infos[-1].out_shape)} per point; it must give [2] (mean, then log-variance of l)"
        )
    covariate = spec.get("covariate")
    categories = {c.name: c.categories for c in covariates if c.categories is not None}
    if covariate is not None and covariate not in categories:
        raise SpecError(f"library: covariate {covariate!r} is not a categorical covariate the document declares")
    components = len(categories[covariate]) if covariate is not None else 1
    values = {}
    for key in ("mean", "log_var"):
        tensor = named_tensor(tensors, spec.get(key), f"library: {key}", finite=True)
        if tensor.numel() != components or tensor.dim() > 1:
            raise SpecError(f"library: {key} tensor {spec.get(key)!r} is {list(tensor.shape)}; it needs [{components}], one per "
                            + (f"category of {covariate}" if covariate else "model (no covariate)"))
        values[key] = tensor.reshape(components)
        used.add(spec[key])
    return Library(LATENT, encoder, values["mean"], values["log_var"], covariate), infos, used


def _hierarchy(
    spec: Any, top: int | None, tensors: Mapping[str, torch.Tensor], bottom: int
) -> tuple[Hierarchy | None, list[LayerInfo], set[str]]:
    """The ``hierarchy`` block: z2's size, q(z2|z1)'s layers (``encoder``) and p(z1|z2)'s (``prior``), checked."""
    if spec is None:
        return None, [], set()
    if not isinstance(spec, Mapping) or set(spec) != {"latent_dim", "encoder", "prior"}:
        raise SpecError(f"hierarchy takes latent_dim, encoder and prior, found {spec!r}")
    chains, infos, used = {}, [], set()
    for key, part, (source, target) in (("encoder", "hierarchy encoder (q(z2|z1))", (bottom, top)),
                                        ("prior", "hierarchy prior (p(z1|z2))", (top, bottom))):
        chain, found, reads = _build_chain(part, spec[key], tensors, (source,))
        if found[-1].out_shape != (2 * target,):
            raise SpecError(f"the {part} gives {format_shape(found[-1].out_shape)} per point; it must give [{2 * target}] "
                            "(mean, then log-variance)")
        _dry_run(chain, (source,), (2 * target,), part)
        chains[key], infos, used = chain, infos + found, used | reads
    return Hierarchy(top, chains["encoder"], chains["prior"]), infos, used


def _dry_run(net: Chain, in_shape: Shape, expected: Shape, part: str, widths: Mapping[str, int] | None = None) -> None:
    """One zero input through ``net``: torch must agree with the shapes inferred layer by layer."""
    encoded = {name: torch.zeros(1, width) for name, width in (widths or {}).items()}
    try:
        with torch.inference_mode():
            found = tuple(net(torch.zeros(1, *in_shape), encoded).shape[1:])
    except RuntimeError as error:
        raise SpecError(f"the {part} fails on a [1, {', '.join(map(str, in_shape))}] input: {error}") from None
    if found != expected:
        raise SpecError(f"the {part} gives {format_shape(found)}, not the {format_shape(expected)} its layers declare")
