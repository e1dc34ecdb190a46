"""scvi-tools' SCVI models as format-1 files (``vaeeval convert --from scvi MODEL_DIR``).

``SCVI.save`` writes a folder holding ``model.pt``, a torch checkpoint: reading it
unpickles, so this is the one place vaeeval runs scvi-tools' own loader, only when the
user names the folder (the command says so on stderr). What it writes is an ordinary
format-1 file that needs nothing else: the counts layer and the covariates' names and
labels are in its document.

An scVI module (``scvi.module.VAE``: ``scvi/module/_vae.py``, ``scvi/nn/_base_components.py``)
maps onto format 1 one to one:

* the encoder is ``log1p`` (``log_variational``), then each ``FCLayers`` layer (a
  linear layer taking the one-hot categorical covariates, and the continuous ones at
  the first layer, then batch norm or layer norm and ReLU; dropout is left out), then the mean and
  variance heads as one linear layer; q's variance is exp(head) + ``var_eps``, format 1's
  ``posterior.variance_floor``;
* the library size is ``observed`` (``use_observed_lib_size``) or ``latent``: the
  ``l_encoder`` network with the per-batch prior N(library_log_means, library_log_vars);
* the decoder is ``px_decoder``'s layers, then one linear layer holding the scale's
  logits (``px_scale_decoder`` before its softmax), the dispersion (``px_r_decoder``,
  ``gene-cell``; or, for ``gene-batch`` and ``gene-label``, the batch's or the cell label's
  column of ``px_r``, as a linear map of its one-hot, the labels then a covariate the data
  supplies) and the zero-inflation logits (``px_dropout_decoder``, ``zinb``);
* ``gene`` dispersion is the likelihood's ``log_theta`` tensor (``px_r``);
* ``latent_distribution="ln"`` (logistic normal): z is the Gaussian draw, the prior N(0, I)
  on it, and the decoder starts with a ``softmax`` layer (scVI's ``z_transformation``), so
  the importance weights are p(x | softmax(z)) p(z) / q(z|x), all of z.

Refused, naming what: other model classes (read from the folder before scvi-tools is
called: ``scvi_saved``), batch embeddings, size factors, the
``normal`` likelihood, a custom variance activation or layer activation.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vaeeval.adapters.scvi_saved import check_scvi_class
from vaeeval.errors import VaeevalError

FAMILIES = {"zinb": "zinb", "nb": "negative_binomial", "poisson": "poisson"}


@dataclass
class _Writer:
    """The document's tensors, gathered under names taken from the module's state dict."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, tensor: torch.Tensor) -> str:
        self.tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
        return name


def load_scvi(folder: str | Path) -> Any:
    """The SCVI model saved in ``folder``, through scvi-tools' loader (it unpickles ``model.pt``), in eval mode.

    Raises:
        VaeevalError: scvi-tools missing, no ``model.pt``, or a folder its loader refuses.
    """
    folder = check_folder(folder)
    import logging

    from scvi import settings
    from scvi.model import SCVI

    quiet = settings.verbosity
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings.verbosity = logging.ERROR  # its INFO lines would go to stdout, where vaeeval's results go
            try:
                model = SCVI.load(str(folder), accelerator="cpu")
            except AttributeError:  # a latent library's prior is set up from data: hand the loader a stand-in
                model = SCVI.load(str(folder), adata=_stand_in(folder), accelerator="cpu")
    except Exception as error:  # scvi-tools' loader: any failure is the folder's, in one line
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VaeevalError(f"{folder}: scvi-tools could not load it ({text})") from None
    finally:
        settings.verbosity = quiet
    model.module.eval()
    return model


def check_folder(folder: str | Path) -> Path:
    """``folder`` if it holds the ``model.pt`` of an SCVI and scvi-tools is installed: checked before anything is loaded.

    The model's class is read from the checkpoint's pickled registry without unpickling
    it (``scvi_saved``), so a SCANVI or TOTALVI folder is refused by name before
    scvi-tools' loader runs.

    Raises:
        VaeevalError: no ``model.pt`` in ``folder``, a model of another class, or scvi-tools missing.
    """
    folder = Path(folder)
    if not (folder / "model.pt").is_file():
        raise VaeevalError(f"{folder}: not a folder SCVI.save wrote (it has no model.pt)")
    check_scvi_class(folder)
    try:
        import scvi  # noqa: F401  (the optional extra)
    except ImportError:
        raise VaeevalError("convert --from scvi needs scvi-tools: pip install 'vaeeval[scvi]'") from None
    return folder


def _stand_in(folder: Path) -> Any:
    """An AnnData with the saved model's genes and covariate categories, for a loader that wants data.

    Its values only set up what the saved state dict then overwrites (the library prior's
    per-batch means and variances are buffers of the module).
    """
    import anndata
    import pandas as pd
    from scvi.model import SCVI

    registry = SCVI.load_registry(str(folder))
    setup = registry["setup_args"]
    genes = [str(name) for name in torch.load(folder / "model.pt", map_location="cpu", weights_only=False)["var_names"]]
    fields = registry["field_registries"]
    columns: dict[str, list[str]] = {}
    if setup.get("batch_key"):
        columns[setup["batch_key"]] = _labels(fields["batch"]["state_registry"]["categorical_mapping"])
    if setup.get("labels_key"):
        columns[setup["labels_key"]] = _labels(fields["labels"]["state_registry"]["categorical_mapping"])
    for name, mapping in fields.get("extra_categorical_covs", {}).get("state_registry", {}).get("mappings", {}).items():
        columns[name] = _labels(mapping)
    cells = max([2, *(len(labels) for labels in columns.values())])
    obs = pd.DataFrame({name: pd.Categorical([labels[i % len(labels)] for i in range(cells)], categories=labels)
                        for name, labels in columns.items()})
    for name in setup.get("continuous_covariate_keys") or []:
        obs[name] = np.zeros(cells, dtype=np.float32)
    obs.index = [f"cell_{i}" for i in range(cells)]
    adata = anndata.AnnData(np.ones((cells, len(genes)), dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))
    if setup.get("layer"):
        adata.layers[setup["layer"]] = adata.X.copy()
    return adata


def scvi_document(model: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The format-1 document and tensors of a loaded SCVI model.

    Raises:
        VaeevalError: a part format 1 cannot hold, named.
    """
    module = model.module
    registry = model.registry_
    _check_expressible(model, module)
    writer = _Writer()
    covariates, continuous, categorical = _covariates(registry, module)
    document: dict[str, Any] = {
        "format": 1,
        "input_shape": [int(module.n_input)],
        "latent_dim": int(module.n_latent),
        "data": {"domain": "counts"},
        "description": f"scvi-tools {registry.get('scvi_version', '?')} SCVI, gene_likelihood={module.gene_likelihood}, "
        f"dispersion={module.dispersion}, latent_distribution={module.latent_distribution}, converted by vaeeval",
    }
    layer = registry.get("setup_args", {}).get("layer")
    if layer:
        document["data"]["layer"] = layer
    if covariates:
        document["covariates"] = covariates
    encoder_inputs = (continuous, categorical) if module.encode_covariates else ((), ())
    transform = [{"type": "log1p"}] if module.log_variational else []
    document["encoder"] = transform + _encoder(module.z_encoder, "z_encoder", writer, *encoder_inputs)
    document["posterior"] = {"variance_floor": float(module.z_encoder.var_eps)}
    if module.use_observed_lib_size:
        document["library"] = {"type": "observed"}
    else:
        if module.l_encoder.var_eps != module.z_encoder.var_eps:
            raise VaeevalError("convert --from scvi: the library encoder's var_eps differs from z's; format 1 has one variance floor")
        n_batch = module.library_log_means.shape[1]
        document["library"] = {
            "type": "latent",
            "encoder": transform + _encoder(module.l_encoder, "l_encoder", writer, *encoder_inputs),
            "mean": writer.add("library_log_means", module.library_log_means.reshape(n_batch)),
            "log_var": writer.add("library_log_vars.log", module.library_log_vars.reshape(n_batch).log()),
        }
        if n_batch > 1:
            document["library"]["covariate"] = _batch_name(registry)
    offset_by = _label_name(registry) if module.dispersion == "gene-label" else _batch_name(registry)
    document["decoder"] = _decoder(module, writer, continuous, categorical, offset_by)
    if module.latent_distribution == "ln":  # z is the Gaussian draw; the decoder reads softmax(z) (``z_transformation``)
        document["decoder"].insert(0, {"type": "softmax"})
    likelihood: dict[str, Any] = {"family": FAMILIES[module.gene_likelihood]}
    if module.gene_likelihood != "poisson" and module.dispersion == "gene":
        likelihood["log_theta"] = writer.add("px_r", module.px_r)
    document["likelihood"] = likelihood
    return document, writer.tensors


def _check_expressible(model: Any, module: nn.Module) -> None:
    from scvi.module import VAE

    def refuse(what: str) -> VaeevalError:
        return VaeevalError(f"convert --from scvi: {what}, which format 1 cannot hold; vaeeval converts SCVI models")

    if type(model).__name__ != "SCVI" or type(module) is not VAE:
        raise refuse(f"the folder holds a {type(model).__name__} model ({type(module).__name__} module)")
    if module.gene_likelihood not in FAMILIES:
        raise refuse(f"gene_likelihood={module.gene_likelihood!r} (vaeeval converts zinb, nb and poisson)")
    if module.latent_distribution not in ("normal", "ln"):
        raise refuse(f"latent_distribution={module.latent_distribution!r}")
    if module.batch_representation != "one-hot":
        raise refuse(f"batch_representation={module.batch_representation!r}")
    if module.use_size_factor_key:
        raise refuse("size factors given in the data (size_factor_key)")
    parts = dict(module.named_modules())
    for name, part in parts.items():
        if name.endswith("fc_layers"):
            for layer in part.modules():
                if not isinstance(layer, (nn.Linear, nn.BatchNorm1d, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Sequential)):
                    raise refuse(f"a {type(layer).__name__} in {name} (vaeeval converts scVI's ReLU networks)")
    for encoder in (module.z_encoder, module.l_encoder):
        if encoder.var_activation is not torch.exp:
            raise refuse("a variance activation other than exp")


def _batch_name(registry: dict[str, Any]) -> str:
    return registry["field_registries"]["batch"]["state_registry"].get("original_key") or "batch"


def _label_name(registry: dict[str, Any]) -> str:
    return registry["field_registries"]["labels"]["state_registry"].get("original_key") or "labels"


def _labels(mapping: Any) -> list[str]:
    return [str(label) for label in np.asarray(mapping).tolist()]


def _covariates(registry: dict[str, Any], module: nn.Module) -> tuple[list[dict[str, Any]], tuple[str, ...], tuple[str, ...]]:
    """The document's covariates, and the continuous and the categorical ones' names in scVI's order.

    scVI concatenates the continuous covariates to its layers' input first, then one-hot
    the batch and the other categorical covariates; a categorical covariate with a single
    category is left out (it carries no information).
    """
    fields = registry["field_registries"]
    declared: list[dict[str, Any]] = []
    continuous: list[str] = []
    categorical: list[str] = []
    cont = fields.get("extra_continuous_covs", {}).get("state_registry", {})
    for name in cont.get("columns", []):
        declared.append({"name": str(name)})
        continuous.append(str(name))
    batch = fields["batch"]["state_registry"]
    batches = _labels(batch["categorical_mapping"])
    declared.append({"name": _batch_name(registry), "categories": batches})
    if len(batches) > 1:
        categorical.append(_batch_name(registry))
    cats = fields.get("extra_categorical_covs", {}).get("state_registry", {})
    for name in cats.get("field_keys", []):
        labels = _labels(cats["mappings"][name])
        declared.append({"name": str(name), "categories": labels})
        if len(labels) > 1:
            categorical.append(str(name))
    used = set(continuous) | set(categorical)
    if not module.use_observed_lib_size and len(batches) > 1:
        used.add(_batch_name(registry))
    if module.dispersion == "gene-label" and module.gene_likelihood != "poisson":  # theta per gene and cell label
        labels = _labels(fields["labels"]["state_registry"]["categorical_mapping"])
        declared.append({"name": _label_name(registry), "categories": labels})
        if len(labels) > 1:
            used.add(_label_name(registry))
    return [entry for entry in declared if entry["name"] in used], tuple(continuous), tuple(categorical)


def _fc_layers(fc: nn.Module, prefix: str, writer: _Writer, first: tuple[str, ...], deeper: tuple[str, ...]) -> list[dict[str, Any]]:
    """An ``FCLayers`` as format-1 layers: each linear layer takes ``first`` (layer 0) or ``deeper`` covariates."""
    specs: list[dict[str, Any]] = []
    for index, (name, block) in enumerate(fc.fc_layers.named_children()):
        taken = first if index == 0 else (deeper if fc.inject_covariates else ())
        for position, layer in enumerate(block):
            path = f"{prefix}.fc_layers.{name}.{position}"
            if isinstance(layer, nn.Linear):
                if layer.bias is None:
                    raise VaeevalError(f"convert --from scvi: {path} has no bias (bias=False), which this converter does not handle")
                spec: dict[str, Any] = {"type": "linear", "tensor": path}
                writer.add(f"{path}.weight", layer.weight)
                writer.add(f"{path}.bias", layer.bias)
                if taken:
                    spec["covariates"] = list(taken)
                specs.append(spec)
            elif isinstance(layer, nn.BatchNorm1d):
                for key in ("running_mean", "running_var", "weight", "bias"):
                    writer.add(f"{path}.{key}", getattr(layer, key))
                specs.append({"type": "batch_norm", "tensor": path, "eps": float(layer.eps)})
            elif isinstance(layer, nn.LayerNorm):  # scVI's: elementwise_affine=False
                spec = {"type": "layer_norm", "eps": float(layer.eps)}
                if layer.weight is not None:
                    spec["tensor"] = writer.add(f"{path}.weight", layer.weight).rsplit(".", 1)[0]
                    writer.add(f"{path}.bias", layer.bias)
                specs.append(spec)
            elif isinstance(layer, nn.ReLU):
                specs.append({"type": "relu"})
    return specs


def _encoder(
    encoder: nn.Module, prefix: str, writer: _Writer, continuous: tuple[str, ...], categorical: tuple[str, ...]
) -> list[dict[str, Any]]:
    """An scVI ``Encoder``: its layers, then mean and raw-variance heads stacked into one linear layer."""
    specs = _fc_layers(encoder.encoder, f"{prefix}.encoder", writer, continuous + categorical, categorical)
    head = f"{prefix}.heads"
    writer.add(f"{head}.weight", torch.cat([encoder.mean_encoder.weight, encoder.var_encoder.weight]))
    writer.add(f"{head}.bias", torch.cat([encoder.mean_encoder.bias, encoder.var_encoder.bias]))
    return [*specs, {"type": "linear", "tensor": head}]


def _decoder(
    module: nn.Module, writer: _Writer, continuous: tuple[str, ...], categorical: tuple[str, ...], offset_by: str
) -> list[dict[str, Any]]:
    """``DecoderSCVI``: its layers, then one head of [scale logits, (log theta), (zero-inflation logits)].

    ``gene-batch`` and ``gene-label`` dispersions are columns of ``px_r`` chosen by the
    categorical covariate ``offset_by`` (the batch, or the cell label): a linear map of its one-hot.
    """
    decoder = module.decoder
    specs = _fc_layers(decoder.px_decoder, "decoder.px_decoder", writer, continuous + categorical, categorical)
    scale = decoder.px_scale_decoder[0]
    weights, biases = [scale.weight], [scale.bias]
    hidden, genes = scale.weight.shape[1], scale.weight.shape[0]
    offsets = None
    if module.gene_likelihood != "poisson":
        if module.dispersion == "gene-cell":
            weights.append(decoder.px_r_decoder.weight)
            biases.append(decoder.px_r_decoder.bias)
        elif module.dispersion in ("gene-batch", "gene-label"):  # log theta = px_r[:, batch or label]
            weights.append(torch.zeros(genes, hidden))
            biases.append(torch.zeros(genes))
            offsets = module.px_r
    if module.gene_likelihood == "zinb":
        weights.append(decoder.px_dropout_decoder.weight)
        biases.append(decoder.px_dropout_decoder.bias)
    head = "decoder.heads"
    weight = torch.cat(weights)
    spec: dict[str, Any] = {"type": "linear", "tensor": head}
    if offsets is not None:
        n_batch = offsets.shape[1]
        covariate_weight = torch.zeros(weight.shape[0], n_batch)
        covariate_weight[genes : 2 * genes] = offsets
        if n_batch > 1:
            weight = torch.cat([weight, covariate_weight], dim=1)
            spec["covariates"] = [offset_by]
        else:
            biases[1] = offsets[:, 0]
    writer.add(f"{head}.weight", weight)
    writer.add(f"{head}.bias", torch.cat(biases))
    return [*specs, spec]


def check_against_scvi(model: Any, converted: Any, *, cells: int = 64, seed: int = 0) -> float:
    """The largest difference between vaeeval's and scVI's numbers on random counts, in nats (or their own units).

    Compares q(z|x)'s mean and standard deviation, and log p(x | z, library) at the
    posterior means through scVI's own ``generative`` and its distribution's ``log_prob``.
    """
    module = model.module
    generator = np.random.default_rng(seed)
    genes = int(module.n_input)
    x = torch.from_numpy(generator.poisson(generator.gamma(2.0, 3.0, size=(cells, genes))).astype(np.float32))
    x[:, 0] += 1  # no cell without counts: scVI's observed library would be log 0
    covariates, scvi_inputs, labels = _random_covariates(model, converted, cells, generator)
    with torch.inference_mode():
        inference = module.inference(x, **scvi_inputs, n_samples=1)
        qz, library = inference["qz"], inference["library"]
        z = qz.loc
        decoded = module.z_encoder.z_transformation(z)  # softmax(z) for a logistic normal, else z
        library = library if module.use_observed_lib_size else inference["ql"].loc
        generative = module.generative(decoded, library, **scvi_inputs, y=labels[:, None])
        theirs = generative["px"].log_prob(x).sum(-1).double()
        mean, log_var = converted.encode(x, covariates)
        differences = [(mean[:, : z.shape[1]] - qz.loc).abs().max(), ((0.5 * log_var[:, : z.shape[1]]).exp() - qz.scale).abs().max()]
        latent = z
        if not module.use_observed_lib_size:
            prior_mean, prior_log_var = converted.library.prior(covariates, cells)
            u = (inference["ql"].loc - prior_mean) * torch.exp(-0.5 * prior_log_var)
            latent = torch.cat([z, u], dim=1)
        params = converted.decode(latent, covariates)
        ours = converted.likelihood.log_prob(params, x)
    differences.append(((ours - theirs).abs() / theirs.abs().clamp(min=1.0)).max())
    return float(max(differences))


def _random_covariates(
    model: Any, converted: Any, cells: int, generator: np.random.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """Random covariates for ``cells`` cells, as vaeeval takes them and as scVI's ``inference``/``generative`` do, and
    random cell labels ``[cells]`` (scVI's ``y``, which its generative takes for a ``gene-label`` dispersion)."""
    registry = model.registry_
    fields = registry["field_registries"]
    n_batch = len(_labels(fields["batch"]["state_registry"]["categorical_mapping"]))
    batch = torch.from_numpy(generator.integers(0, n_batch, cells))
    ours: dict[str, torch.Tensor] = {}
    if _batch_name(registry) in converted.covariates:
        ours[_batch_name(registry)] = batch
    cont_names = [name for name in converted.covariates if name not in converted.categories]
    cont = torch.from_numpy(generator.normal(size=(cells, len(cont_names))).astype(np.float32)) if cont_names else None
    for index, name in enumerate(cont_names):
        ours[name] = cont[:, index]
    cats = fields.get("extra_categorical_covs", {}).get("state_registry", {})
    columns = []
    for name in cats.get("field_keys", []):
        codes = torch.from_numpy(generator.integers(0, len(cats["mappings"][name]), cells))
        columns.append(codes)
        if name in converted.covariates:
            ours[name] = codes
    n_labels = len(_labels(fields["labels"]["state_registry"]["categorical_mapping"]))
    labels = torch.from_numpy(generator.integers(0, n_labels, cells))  # scVI's y (its generative's, not inference's)
    if _label_name(registry) in converted.covariates:
        ours[_label_name(registry)] = labels
    scvi_inputs = {
        "batch_index": batch[:, None],
        "cont_covs": cont,
        "cat_covs": torch.stack(columns, dim=1) if columns else None,
    }
    return ours, scvi_inputs, labels


AGREEMENT = 1e-4  # float32 networks computed in another order, and scVI's eps = 1e-8 inside its logs


@dataclass(frozen=True)
class ScviConversion:
    """What ``convert_scvi`` wrote and how it was checked."""

    path: Path
    model: Any  # the format-1 model as vaeeval reads it
    family: str
    library: str
    covariates: tuple[str, ...]
    largest_difference: float


def convert_scvi(folder: str | Path, out: str | Path, *, seed: int = 0) -> ScviConversion:
    """Write the SCVI model saved in ``folder`` as a format-1 file, kept only if it gives scVI's own numbers.

    The check (``check_against_scvi``) compares q(z|x) and log p(x | z, library) on random
    counts and covariates through scVI's own modules.

    Raises:
        VaeevalError: scvi-tools missing, a folder its loader refuses, a model format 1 cannot hold, or numbers that differ.
    """
    from safetensors.torch import save_file

    from vaeeval.format.model import METADATA_KEY
    from vaeeval.format.reading import load_model
    from vaeeval.io.files import staged, writing

    out = Path(out)
    model = load_scvi(folder)
    document, tensors = scvi_document(model)
    with writing(out, "model"), staged(out) as temporary:  # out appears only once every number agreed
        save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(document)})
        converted = load_model(temporary)
        largest = check_against_scvi(model, converted, seed=seed)
        if not largest <= AGREEMENT:
            raise VaeevalError(f"the converted model differs from scVI's by {largest:.3g} (relative), more than float32 rounding; "
                               f"{out} not written")
    return ScviConversion(out, replace(converted, path=out), document["likelihood"]["family"], document["library"]["type"],
                          converted.covariates, largest)
