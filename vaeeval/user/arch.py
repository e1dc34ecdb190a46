"""Bring your own architecture: evaluate a user's PyTorch VAE class through a small protocol.

``--arch`` names a class or factory (``path/to/file.py:VAE``, ``package.module:make_vae``,
or a name registered under the entry-point group ``vaeeval.architectures``). It is
the only way vaeeval runs code that is not its own, and only the code the user
names. The object it builds must be a ``torch.nn.Module`` with:

* ``encode(x)`` returning ``(mean, log_var)``, each ``[B, latent_dim]``, or a
  ``torch.distributions.Normal`` / ``Independent(Normal)``;
* ``decode(z)`` returning the likelihood's parameters (a tensor, or a tuple of
  tensors for P > 1) with P x D values per point.

The weights come from a safetensors state dict, loaded strictly. Decoders that
return probabilities (``--decoder-output probs``, e.g. a final sigmoid) are read
as logits: where ``decode`` can be traced, the final sigmoid is skipped, which
is exact; otherwise the probabilities are clamped to [eps, 1 - eps] as
torch.distributions does, and the model's description says so.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributions import Distribution

from vaeeval.core import rng
from vaeeval.errors import VaeevalError, listing, option
from vaeeval.format.data import covariate_dtype
from vaeeval.format.likelihoods import BINARY, Likelihood, likelihood_from_spec
from vaeeval.format.model import Model
from vaeeval.format.priors import prior_from_spec
from vaeeval.format.reading import read_safetensors
from vaeeval.io.files import file_digest
from vaeeval.user import discrete
from vaeeval.user.calls import USER_FAILURES, call_user, first_line, where
from vaeeval.user.discrete import point_mass
from vaeeval.user.distributions import describe, keyed
from vaeeval.user.hierarchy import GroupsDecoder, Layout, Plan, groups_note, plan_of, posterior_chain, prior_chain
from vaeeval.user.methods import DecoderAdapter, EncoderAdapter, describe_value, logits_graph, probabilities_kind
from vaeeval.user.protocol import (
    ASSUMED,
    ArchModel,
    DistributionLikelihood,
    DistributionPrior,
    as_posterior,
    diagonal,
    discreteness,
    standard_normal,
    unkeyed_note,
)
from vaeeval.user.sequences import DATA, LENGTHS, MASK, arguments, check_maskable, needs_lengths, per_position, takes

ENTRY_POINT_GROUP = "vaeeval.architectures"


@dataclass(frozen=True)
class ArchOptions:
    """How to read a user's model through the protocol.

    Attributes:
        spec: ``file.py:Attr``, ``package.module:attr`` or a registered name.
        args: keyword arguments for the class or factory.
        likelihood: a format-1 likelihood block (tensor names refer to the weights file); none
            when ``decode`` returns a distribution.
        decoder_output: ``logits`` (the family's format-1 parameters), ``probs``
            (probabilities) or ``mean`` (the distribution's mean).
        encode_method, decode_method: the methods to call.
        encode_shape: the shape ``encode`` takes per point, when it differs from the data's.
        covariates: names of the data file's arrays passed to ``encode`` and ``decode`` as
            keyword arguments, per point.
        lengths: ``--lengths``, where the data are padded sequences (``user.sequences``): which positions count.
    """

    spec: str
    likelihood: Mapping[str, Any] | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    decoder_output: str = "logits"
    encode_method: str = "encode"
    decode_method: str = "decode"
    encode_shape: tuple[int, ...] | None = None
    covariates: tuple[str, ...] = ()
    lengths: str | None = None


def registered_architectures() -> dict[str, importlib.metadata.EntryPoint]:
    """Names registered by installed packages under the ``vaeeval.architectures`` entry-point group."""
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import_file(spec: str, path: Path) -> Any:
    if not path.is_file():
        raise VaeevalError(f"{option('arch')} {spec}: {path}: no such file")
    name = f"vaeeval_arch_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # while it runs, as for any import (dataclasses look themselves up there)
    sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except USER_FAILURES as error:  # the user's code: any failure is reported, in one line
        raise VaeevalError(f"{option('arch')} {spec}: running {path} raised {first_line(error)}{where(error)}") from None
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(path.resolve().parent))
    return module


def _import_module(spec: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except USER_FAILURES as error:
        raise VaeevalError(f"{option('arch')} {spec}: importing {name} raised {first_line(error)}") from None


def source_files(spec: str | None) -> list[Path]:
    """The files ``--arch spec`` runs: FILE.py, or a module's file and its packages' ``__init__.py`` (found without
    importing the module itself); none for a registered name. An output must never be one of them."""
    if not spec or ":" not in spec:
        return []
    source = spec.rpartition(":")[0]
    if source.endswith(".py") or "/" in source or "\\" in source:
        return [Path(source)]
    found = []
    parts = source.split(".")
    for end in range(1, len(parts) + 1):
        try:
            module_spec = importlib.util.find_spec(".".join(parts[:end]))
        except USER_FAILURES:  # a parent package that does not import: loading will say so
            break
        if module_spec is None or not module_spec.origin or not module_spec.has_location:
            break
        found.append(Path(module_spec.origin))
    return found


def load_architecture(spec: str) -> Callable[..., Any]:
    """The class or factory ``spec`` names. Runs the user's code (importing it).

    Raises:
        VaeevalError: no such file, module, attribute or registered name, or an import that raised.
    """
    if ":" not in spec:
        registered = registered_architectures()
        if spec not in registered:
            known = ", ".join(sorted(registered)) or "none are installed"
            raise VaeevalError(
                f"{option('arch')} {spec}: not FILE.py:NAME, package.module:NAME or a registered architecture ({known})"
            )
        try:
            return registered[spec].load()
        except USER_FAILURES as error:
            raise VaeevalError(f"{option('arch')} {spec}: loading its entry point raised {first_line(error)}") from None
    source, _, attribute = spec.rpartition(":")
    looks_like_file = source.endswith(".py") or "/" in source or "\\" in source
    module = _import_file(spec, Path(source)) if looks_like_file else _import_module(spec, source)
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise VaeevalError(
                f"{option('arch')} {spec}: {source} has no attribute {attribute!r} (it defines {', '.join(public) or 'nothing callable'})"
            )
        target = getattr(target, part)
    return target


def build_module(spec: str, factory: Callable[..., Any], args: Mapping[str, Any]) -> nn.Module:
    """Call the class or factory with ``args``; the result must be an ``nn.Module``."""
    if isinstance(factory, nn.Module):
        if args:
            raise VaeevalError(f"{option('arch')} {spec}: names a module instance, which takes no {option('arch_args')}")
        module = factory
    else:
        try:
            module = factory(**args)
        except USER_FAILURES as error:
            shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
            raise VaeevalError(f"{option('arch')} {spec}: {spec.rpartition(':')[2]}({shown}) raised {first_line(error)}") from None
    if not isinstance(module, nn.Module):
        raise VaeevalError(f"{option('arch')} {spec}: built a {type(module).__name__}, not a torch.nn.Module")
    return module


def with_weights(factory: Callable[..., Any], args: Mapping[str, Any], weights: Path) -> Mapping[str, Any]:
    """``args``, and the weights file's path as ``weights`` for a factory whose signature names it (a framework's
    loader reads the configuration saved beside the weights, e.g. diffusers' ``config.json``)."""
    try:
        names = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return args
    return {**args, "weights": str(weights)} if "weights" in names and "weights" not in args else args


def load_state(module: nn.Module, tensors: Mapping[str, torch.Tensor], path: Path, spec: str, extra: Sequence[str] = ()) -> None:
    """Load ``tensors`` into ``module`` strictly; every mismatch is listed in one error.

    Args:
        extra: tensor names the file may hold beyond the module's state dict (a likelihood tensor).
    """
    expected = module.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected and name not in extra]
    wrong = [
        f"{name} is {list(tensors[name].shape)} in the file, {list(expected[name].shape)} in the module"
        for name in expected
        if name in tensors and tuple(tensors[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {listing(missing, 6, counted=True)}")
    if unexpected:
        problems.append(f"unexpected {listing(unexpected, 6, counted=True)}")
    problems.extend(wrong[:5])
    if problems:
        raise VaeevalError(f"{path}: does not fit {option('arch')} {spec}: " + "; ".join(problems))
    module.load_state_dict({name: tensors[name] for name in expected}, strict=True)


# ---------------------------------------------------------------- the model


def _call(what: str, function: Callable[[], Any]) -> Any:
    with torch.no_grad():  # not inference mode: a prior() kept as it is (a user's subclass) is differentiated through by AIS
        return call_user(what, function)


# Decoder outputs declared as logits that all lie in [0, 1] over this many probe draws of z ~ N(0, I)
# are most likely probabilities: the output warns that --decoder-output probs may be forgotten.
_PROBE_DRAWS = 64


def _probe_covariates(covariates: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, torch.Tensor]:
    """Zeros shaped and typed as two points' covariates, to probe ``encode`` and ``decode`` with."""
    return {name: torch.zeros((2, *shape), dtype=covariate_dtype(dtype)) for name, (shape, dtype) in covariates.items()}


def _prior(module: nn.Module, latent_dim: int, posterior: Distribution, layout: Layout | None = None) -> DistributionPrior | None:
    """The model's ``prior()`` as p(z), checked to be a distribution over one latent vector; None without one.

    ``layout``: a hierarchical q's groups, which a ``prior()`` returning groups must name alike.
    """
    if not callable(getattr(module, "prior", None)):
        return None
    found = _call("prior()", module.prior)
    if isinstance(found, Mapping):
        if layout is None:
            raise VaeevalError("prior() returned groups (a mapping); encode(x) must then return the same groups")
        with torch.no_grad():  # called again outside inference mode: AIS differentiates through what its factors capture
            found = prior_chain(call_user("prior()", module.prior), layout)
    if not isinstance(found, Distribution):
        raise VaeevalError(f"prior() returned {describe_value(found)}; vaeeval needs a torch.distributions.Distribution over z")
    if tuple(found.event_shape) != (latent_dim,) or tuple(found.batch_shape) != ():
        raise VaeevalError(
            f"prior() returned {describe(found)} with batch shape {list(found.batch_shape)} and event shape "
            f"{list(found.event_shape)}; vaeeval needs batch [] and event [{latent_dim}] (encode's latent dimension)"
        )
    return DistributionPrior(found, latent_dim, posterior)


def _logits_warning(decoder: DecoderAdapter, latent_dim: int, covariates: Mapping[str, torch.Tensor], family: str) -> str | None:
    """A note when outputs declared as logits all lie in [0, 1] (``--decoder-output probs`` probably forgotten)."""
    z = rng.standard_normal(0, np.arange(1), 0, _PROBE_DRAWS, latent_dim)[0].float()
    repeated = {name: value[:1].expand(_PROBE_DRAWS, *value.shape[1:]) for name, value in covariates.items()}
    outputs = _call(f"{decoder.method}(z)", lambda: decoder.call(z, repeated))
    if isinstance(outputs, torch.Tensor) and bool(((outputs >= 0) & (outputs <= 1)).all()):
        return (
            f"warning: every {decoder.method}(z) output lies in [0, 1] although --decoder-output says logits: "
            f"if decode ends in a sigmoid or softmax, pass --decoder-output probs (the {family} numbers are wrong "
            "otherwise)"
        )
    return None


def arch_model(
    weights: str | Path,
    options: ArchOptions,
    input_shape: Sequence[int],
    covariates: Mapping[str, tuple[tuple[int, ...], np.dtype]] | None = None,
) -> Model:
    """Build a model from a user's class and a safetensors state dict.

    A model whose posterior is a diagonal Normal, whose decoder gives format-1
    parameters, with no ``prior()`` and no covariates, takes the fast format-1 path;
    anything else is an ``ArchModel`` evaluated through its distributions.

    Args:
        weights: the state dict, a safetensors file.
        options: how to find, build and read the user's model.
        input_shape: the shape of one data point.
        covariates: each covariate's shape per point and dtype, by the name ``encode``
            and ``decode`` take it as a keyword argument.

    Raises:
        VaeevalError: anything that stops the model from being built or probed, in one line.
    """
    weights = Path(weights)
    covariates = dict(covariates or {})
    _, tensors = read_safetensors(weights)
    factory = load_architecture(options.spec)
    module = build_module(options.spec, factory, with_weights(factory, options.args, weights)).float().eval()
    spec = dict(options.likelihood or {})
    likelihood_tensor_names = [v for k, v in spec.items() if k != "family" and isinstance(v, str)]
    load_state(module, tensors, weights, options.spec, extra=likelihood_tensor_names)
    for method in (options.encode_method, options.decode_method):
        if not callable(getattr(module, method, None)):
            flag = option("encode_method" if method == options.encode_method else "decode_method")
            raise VaeevalError(f"{option('arch')} {options.spec}: {type(module).__name__} has no method {method!r} (see {flag})")
    input_shape = tuple(int(s) for s in input_shape)
    if options.encode_shape is not None and math.prod(options.encode_shape) != math.prod(input_shape):
        raise VaeevalError(
            f"{option('input_shape')} {list(options.encode_shape)} holds {math.prod(options.encode_shape)} values; "
            f"a data point holds {math.prod(input_shape)}"
        )

    probe = _probe_covariates(covariates)
    encode, decode = getattr(module, options.encode_method), getattr(module, options.decode_method)
    positions = input_shape[0] if options.lengths is not None else None  # T: the data are padded sequences
    if positions is not None:
        probe[LENGTHS] = torch.full((2,), positions, dtype=torch.int64)
    teacher_forced = _teacher_forced(decode)
    for name, method in ((options.encode_method, encode), (options.decode_method, decode)):
        needed = needs_lengths(method) if positions is None and LENGTHS not in covariates else None
        if needed:
            raise VaeevalError(f"{name} takes {needed}: the data are padded sequences, so give their lengths with "
                               f"{option('lengths')}")
    encoder = EncoderAdapter(module, options.encode_method, options.encode_shape)
    x = torch.zeros(2, *input_shape)
    encoded = _call(f"{options.encode_method}(x)", lambda: encoder.call(x, arguments(encode, probe, positions)))
    plan: Plan | None = None
    if isinstance(encoded, Mapping):  # a hierarchical latent: groups with conditional factors (user/hierarchy.py)
        plan = _call(f"{options.encode_method}(x)", lambda: plan_of(encoded, f"{options.encode_method}(x)", 2))
        posterior = posterior_chain(encoded, plan, options.encode_method, x)
    else:
        posterior = _call(f"{options.encode_method}(x)", lambda: as_posterior(encoded, options.encode_method, 2))
    latent_dim = int(posterior.event_shape[0])
    prior = _prior(module, latent_dim, posterior, None if plan is None else plan.layout)
    z = torch.zeros(2, latent_dim)
    given = z if plan is None else plan.layout.split(z)
    decoding = arguments(decode, {**probe, **({DATA: x} if teacher_forced else {})}, positions)
    raw = _call(f"{options.decode_method}(z)", lambda: partial(decode, **decoding)(given))
    notes: list[str] = []
    if (teacher_forced or positions is not None) and not isinstance(raw, Distribution):
        needs = f"{options.decode_method}(z, x) (teacher forcing)" if teacher_forced else option("lengths")
        raise VaeevalError(f"{needs}: {options.decode_method} returns {describe_value(raw)}; vaeeval needs a "
                           "torch.distributions object over the sequence from it")
    if isinstance(raw, Distribution):
        if options.likelihood:
            raise VaeevalError(
                f"{option('likelihood')}: {options.decode_method}(z) returns {describe(raw)}, which is the "
                f"likelihood itself; leave {option('likelihood')} out"
            )
        likelihood: Likelihood = DistributionLikelihood(raw, input_shape, options.decode_method)
        decoder = _grouped(DecoderAdapter(module, options.decode_method, None, None), plan)
        how = f"{options.decode_method}(z) returns {likelihood.spec['distribution']}, whose log_prob is log p(x|z)"
        if positions is not None:
            masks_itself = takes(decode, LENGTHS) or takes(decode, MASK)
            check_maskable(raw, 2, positions, options.decode_method, masks_itself)
            how += (f"; --lengths {options.lengths}: " + ("decode takes lengths or mask, and its log_prob is taken as already masked"
                    if masks_itself and per_position(raw, 2, positions) is None else "positions past each length left out of log p(x|z)"))
        if teacher_forced:
            how += f"; {options.decode_method}(z, x) is given each draw's data point (teacher forcing)"
    else:
        if not options.likelihood:
            raise VaeevalError(
                f"{options.decode_method}(z) returns {describe_value(raw)}: say which distribution it parameterizes with "
                f"{option('likelihood')} (or return a torch.distributions object from it)"
            )
        float_tensors = {name: t.float() for name, t in tensors.items() if t.is_floating_point()}
        try:
            likelihood = likelihood_from_spec(spec, float_tensors, input_shape)
        except ValueError as error:
            raise VaeevalError(f"{option('likelihood')}: {error}") from None
        kind = probabilities_kind(likelihood, options.decoder_output)
        if plan is not None and kind:
            traced, untraced = None, f"{options.decode_method} takes the latent groups as a mapping, which vaeeval does not trace"
        else:
            traced, untraced = logits_graph(module, options.decode_method, kind, likelihood, latent_dim) if kind else (None, None)
        decoder = _grouped(DecoderAdapter(module, options.decode_method, kind, traced, untraced, likelihood.params_per_dim), plan)
        decoded = _call(f"{options.decode_method}(z)", lambda: decoder.call(z, probe))
        _check_parameters(decoded, likelihood, options.decode_method, input_shape)
        if kind is None and options.decoder_output == "logits" and likelihood.decoder_outputs.get("probs"):
            warning = _logits_warning(decoder, latent_dim, probe, likelihood.family)
            if warning:
                notes.append(warning)
        how = _decoder_how(kind, traced, untraced, options.decoder_output, likelihood)

    general = not diagonal(posterior) or prior is not None or isinstance(raw, Distribution) or bool(covariates)
    general = general or teacher_forced or positions is not None
    if prior is None:
        notes.insert(0, ASSUMED)
        prior = standard_normal(latent_dim, posterior) if general else prior_from_spec(None, {}, latent_dim)
        prior.spec["source"] = ASSUMED  # in words in the notes, and in JSON here
    if plan is not None:
        notes.append(groups_note(plan, prior.distribution(z)))
    if general and not keyed(posterior):
        notes.append(unkeyed_note(posterior))
    fields = {
        "encoder": encoder,
        "decoder": decoder,
        "likelihood": likelihood,
        "prior": prior,
        "input_shape": input_shape,
        "latent_dim": latent_dim,
        "description": f"--arch {options.spec} ({type(module).__name__}); decoder: {how}",
        "path": weights,
        "digest": file_digest(weights),
        "arch": options.spec,
        "extra_parameters": sum(p.numel() for p in module.parameters()),
        "decoder_width": max((p.shape[0] for p in module.parameters() if p.dim() > 0), default=0),
        "notes": tuple(notes),
    }
    if not general:
        return Model(**fields)
    return ArchModel(
        **fields,
        general=True,
        posterior_of=(
            (lambda x, c: as_posterior(encoder.call(x, arguments(encode, c, positions)), options.encode_method, x.shape[0]))
            if plan is None
            else (lambda x, c: posterior_chain(encoder.call(x, arguments(encode, c, positions)), plan, options.encode_method, x))
        ),
        decode_of=lambda z, c: decoder.call(z, arguments(decode, c, positions)),
        covariates=tuple(covariates),
        positions=positions,
        teacher_forced=teacher_forced,
        discrete_latent=discreteness(posterior, prior.distribution(z)),
        discrete_posterior=posterior.support.is_discrete,
        discrete_family=discrete.family_of(posterior),
        latent_groups=() if plan is None else plan.layout.names,
        point_mass=point_mass(posterior),
    )


def _teacher_forced(decode: Callable[..., Any]) -> bool:
    """``decode`` takes the data as ``x`` besides z (``decode(z, x)``): not a ``decode(x)`` whose z is named x."""
    try:
        names = list(inspect.signature(decode).parameters)
    except (TypeError, ValueError):
        return False
    return bool(names) and names[0] != DATA and takes(decode, DATA)


def _grouped(decoder: DecoderAdapter, plan: Plan | None) -> DecoderAdapter:
    """``decode`` as vaeeval calls it with a flat z: for a hierarchical latent, given the groups by name."""
    return decoder if plan is None else GroupsDecoder(decoder, plan.layout)


def _check_parameters(decoded: torch.Tensor, likelihood: Likelihood, method: str, input_shape: tuple[int, ...]) -> None:
    """``decode``'s parameters are as many per point as the likelihood needs; a missing scale is named."""
    dims = math.prod(input_shape)
    needed = likelihood.params_per_dim * dims
    if decoded.shape[1] == needed:
        return
    message = (
        f"{method}(z) gives {decoded.shape[1]} values per point; the {likelihood.family} likelihood needs "
        f"P x D = {likelihood.params_per_dim} x {dims} = {needed}"
    )
    if likelihood.scale_keys and likelihood.params_per_dim == 2 and decoded.shape[1] == dims:
        message += (
            f" (a location, then a log-scale, per dimension): for a fixed scale pass {option('sigma')}, for a learned "
            f"one kept in the state dict {option('log_sigma_tensor')}"
        )
    raise VaeevalError(message)


def _decoder_how(kind: str | None, traced: nn.Module | None, untraced: str | None, decoder_output: str,
                 likelihood: Likelihood) -> str:
    """How the decoder's output was read, as the model's description says it."""
    if kind is None and decoder_output == "logits":  # the family's own format-1 parameters, named as they are
        if likelihood.family in ("gaussian", "laplace"):
            return "outputs read as means" + (", then log-scales" if likelihood.params_per_dim == 2 else "")
        return f"outputs read as the {likelihood.family} likelihood's parameters (logits)"
    if kind is None:
        return f"{decoder_output} outputs"
    squash = "sigmoid" if kind == BINARY else "softmax"
    if traced is not None:
        return f"logits read before its final {squash}"
    return f"probabilities clamped to [eps, 1 - eps] ({untraced})"
