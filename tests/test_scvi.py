"""scvi-tools' SCVI through ``vaeeval convert --from scvi``: the same numbers as scVI's own modules, per-cell
IWAE equal to its ``marginal_ll`` within Monte Carlo error, and zinb, nb and poisson ranked by ``compare``."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli

scvi = pytest.importorskip("scvi")

EPOCHS = 100
SAMPLES = 500
FAMILIES = {"zinb": "zinb", "nb": "negative_binomial", "poisson": "poisson"}


def _train(adata, folder: Path, epochs: int = EPOCHS, **options) -> Path:
    """An SCVI model trained on the CPU, saved as ``SCVI.save`` saves it."""
    scvi.settings.seed = 0
    model = scvi.model.SCVI(adata, **options)
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, logger=False, enable_checkpointing=False)
    model.save(str(folder), overwrite=True)
    return folder


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """scvi-tools' synthetic data (400 cells, 100 genes, 2 batches) as .h5ad, and the SCVI of each likelihood,
    converted."""
    logging.getLogger("scvi").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("scvi")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = scvi.data.synthetic_iid()
        adata.write_h5ad(root / "cells.h5ad")
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        models, converted = {}, {}
        for name in FAMILIES:
            models[name] = _train(adata, root / name, gene_likelihood=name)
            result = cli("convert", "--from", "scvi", models[name], "-o", root / f"{name}.safetensors")
            assert result.stdout.startswith(f"wrote {root / name}.safetensors: format 1, {FAMILIES[name]} likelihood")
            assert result.stderr.count("\n") == 1 and "scvi-tools' own loader" in result.stderr
            converted[name] = root / f"{name}.safetensors"
    return {"root": root, "adata": adata, "models": models, "converted": converted}


def _marginal_ll(folder: Path, adata, samples: int) -> np.ndarray:
    """scVI's own estimate, per cell: batch size = the number of cells (its per-minibatch mean is not used)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI.load(str(folder), adata=adata, accelerator="cpu")
        scvi.settings.seed = 1
        return np.asarray(model.get_marginal_ll(adata, n_mc_samples=samples, batch_size=adata.n_obs, return_mean=False),
                          dtype=np.float64).reshape(-1)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_per_cell_iwae_equals_scvis_marginal_ll_within_monte_carlo_error(cells, name):
    """Both estimate E[log mean of K importance weights] for every cell with independent draws: the mean
    over cells of the paired difference is within 4 of its standard errors of 0 (cells are independent), and
    cell by cell vaeeval and scVI differ no more than two vaeeval runs with different seeds differ (the
    median absolute difference, whose sampling error over 400 cells is under 10%: 4 of them allowed)."""
    def iwae(seed: int) -> tuple[dict, np.ndarray]:
        out = json.loads(cli("elbo", cells["converted"][name], cells["root"] / "cells.h5ad", "-k", SAMPLES, "--seed", seed,
                             "--json").stdout)
        return out, np.array([point["iwae"] for point in out["points"]])

    out, ours = iwae(0)
    assert out["model"]["library"] == "observed" and out["model"]["covariates"] == ["batch"]
    assert out["summary"]["measure"] == "probability"
    theirs = _marginal_ll(cells["models"][name], cells["adata"], SAMPLES)
    difference = ours - theirs
    stderr = difference.std(ddof=1) / math.sqrt(difference.size)
    assert abs(difference.mean()) < 4 * stderr, (difference.mean(), stderr)
    noise = np.median(np.abs(ours - iwae(1)[1]))
    assert 0.6 * noise < np.median(np.abs(difference)) < noise / 0.6, (np.median(np.abs(difference)), noise)


def test_compare_ranks_zinb_nb_and_poisson_with_paired_standard_errors(cells):
    converted = cells["converted"]
    out = json.loads(cli("compare", converted["zinb"], converted["nb"], converted["poisson"], cells["root"] / "cells.h5ad",
                         "-k", 200, "--json").stdout)
    (ranking,) = out["rankings"]
    assert ranking["ranked"] and ranking["measure"] == "probability" and len(ranking["order"]) == 3
    means = {Path(entry["model"]["path"]).stem: entry["summary"]["iwae"]["mean"] for entry in out["models"]}
    assert [means[Path(path).stem] for path in ranking["order"]] == sorted(means.values(), reverse=True)
    for difference in out["differences"]:  # paired over the same cells: tighter than treating the means as independent
        assert difference["metric"] == "iwae" and 0 < difference["stderr"] <= difference["unpaired_stderr"]
        assert difference["mean"] > 0  # each model's deficit to the best
    # synthetic_iid draws negative binomial counts: a Poisson cannot hold their overdispersion
    assert Path(ranking["order"][-1]).stem == "poisson"


def test_a_latent_library_and_batch_dispersion_convert_to_scvis_numbers(cells, tmp_path):
    """The library as a latent with its per-batch prior, and theta per gene and batch: convert checks q(z|x) and
    log p(x | z, l) against scVI's modules; the estimates agree with marginal_ll over the cells."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = _train(cells["adata"], tmp_path / "latent", gene_likelihood="nb", dispersion="gene-batch",
                        use_observed_lib_size=False)
    cli("convert", "--from", "scvi", folder, "-o", tmp_path / "latent.safetensors")
    out = json.loads(cli("elbo", tmp_path / "latent.safetensors", cells["root"] / "cells.h5ad", "-k", SAMPLES, "--json").stdout)
    assert out["model"]["library"] == "latent" and out["model"]["latent_dim"] == 11
    ours = np.array([point["iwae"] for point in out["points"]])
    difference = ours - _marginal_ll(folder, cells["adata"], SAMPLES)
    assert abs(difference.mean()) < 4 * difference.std(ddof=1) / math.sqrt(difference.size) + 0.05


@pytest.mark.parametrize(
    ("options", "covariates", "layers"),
    [
        ({"use_layer_norm": "both", "use_batch_norm": "none", "gene_likelihood": "zinb"}, ["batch"],
         ["log1p", "linear", "layer_norm", "relu", "linear", "linear", "layer_norm", "relu", "linear"]),
        ({"dispersion": "gene-label", "gene_likelihood": "nb"}, ["batch", "labels"],
         ["log1p", "linear", "batch_norm", "relu", "linear", "linear", "batch_norm", "relu", "linear"]),
    ],
    ids=["layer-norm", "gene-label"],
)
def test_layer_norm_and_a_dispersion_per_cell_label_convert_to_scvis_numbers(tmp_path, options, covariates, layers):
    """Layer norm in every FCLayers (format 1's layer_norm) and theta per gene and cell label (a categorical covariate
    choosing the column of px_r): convert checks q(z|x) and log p(x | z, l) against scVI's modules; vaeeval's per-cell
    IWAE agrees with marginal_ll within 3 standard errors of the paired difference (independent draws, same cells)."""
    samples = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = scvi.data.synthetic_iid()
        adata.write_h5ad(tmp_path / "cells.h5ad")
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
        folder = _train(adata, tmp_path / "model", epochs=10, **options)
    cli("convert", "--from", "scvi", folder, "-o", tmp_path / "m.safetensors")
    inspected = json.loads(cli("inspect", tmp_path / "m.safetensors", "--json").stdout)
    assert [layer["type"] for layer in inspected["layers"]] == layers
    assert inspected["layers"][-1]["detail"].endswith("covariates=['labels']") == ("dispersion" in options)
    out = json.loads(cli("elbo", tmp_path / "m.safetensors", tmp_path / "cells.h5ad", "-k", samples, "--json").stdout)
    assert out["model"]["covariates"] == covariates
    ours = np.array([point["iwae"] for point in out["points"]])
    difference = ours - _marginal_ll(folder, adata, samples)
    assert abs(difference.mean()) < 3 * difference.std(ddof=1) / math.sqrt(difference.size), (difference.mean(), difference.std())
    small, large = (json.loads(cli("elbo", tmp_path / "m.safetensors", tmp_path / "cells.h5ad", "-k", 20, "--batch-size", size,
                                   "--json").stdout)["points"] for size in (7, 100))
    assert [point["iwae"] for point in small] == [point["iwae"] for point in large]  # layer norm's bits are each cell's own


def _float64_iwae(model, adata, samples: int, seed: int) -> np.ndarray:
    """log (1/K) sum_k p(x | softmax(u_k), l) N(u_k; 0, I) / q(u_k | x) per cell, u_k drawn from q, through scVI's own
    modules in float64: importance sampling over the Gaussian z that the logistic normal's softmax transforms."""
    module = model.module.double().eval()
    counts = adata.X.todense() if hasattr(adata.X, "todense") else adata.X
    x = torch.from_numpy(np.asarray(counts, dtype=np.float64))
    batch = torch.from_numpy(adata.obs["_scvi_batch"].to_numpy().astype(np.int64))[:, None]
    with torch.no_grad():
        inference = module.inference(x, batch, n_samples=1)
        qz = inference["qz"]
        noise = torch.randn((samples, *qz.loc.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        u = qz.loc + qz.scale * noise
        px = module.generative(torch.softmax(u, -1), inference["library"], batch)["px"]
        log_w = px.log_prob(x).sum(-1) + torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1) - qz.log_prob(u).sum(-1)
    return (torch.logsumexp(log_w, 0) - math.log(samples)).numpy()


def test_a_logistic_normal_z_converts_and_its_marginal_ll_is_settled_by_a_float64_computation(tmp_path):
    """latent_distribution='ln': z Gaussian, the decoder reading softmax(z). vaeeval's per-cell IWAE equals an
    independent float64 importance sampler over z within 3 standard errors; scVI's marginal_ll does not (it takes
    log p(z) and log q(z|x) at softmax(z), not at the Gaussian draw), by far more than its Monte Carlo error."""
    samples = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = scvi.data.synthetic_iid()
        adata.write_h5ad(tmp_path / "cells.h5ad")
        scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
        folder = _train(adata, tmp_path / "model", epochs=30, latent_distribution="ln", gene_likelihood="nb")
        cli("convert", "--from", "scvi", folder, "-o", tmp_path / "m.safetensors")
        model = scvi.model.SCVI.load(str(folder), adata=adata, accelerator="cpu")
    inspected = json.loads(cli("inspect", tmp_path / "m.safetensors", "--json").stdout)
    assert [layer["type"] for layer in inspected["layers"] if layer["part"] == "decoder"][0] == "softmax"
    out = json.loads(cli("elbo", tmp_path / "m.safetensors", tmp_path / "cells.h5ad", "-k", samples, "--json").stdout)
    ours = np.array([point["iwae"] for point in out["points"]])
    theirs = _marginal_ll(folder, adata, samples)
    exact = _float64_iwae(model, adata, samples, seed=7)

    def standard_errors(difference: np.ndarray) -> float:
        return abs(difference.mean()) / (difference.std(ddof=1) / math.sqrt(difference.size))

    assert standard_errors(ours - exact) < 3, (ours - exact).mean()
    assert standard_errors(theirs - exact) > 10 and (theirs - exact).mean() > 5, (theirs - exact).mean()


def test_the_counts_layer_is_recorded_and_an_observed_library_is_not_ranked_against_a_latent_one(cells, tmp_path):
    """An SCVI set up on layers["counts"] (X holding normalized values, which are no counts) converts to a file
    that reads that layer from the .h5ad by itself; log p(x | library size) and log p(x) are not ranked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = scvi.data.synthetic_iid()  # its own: setting up a copy of the shared one would unregister that
        adata.layers["counts"] = adata.X.copy()
        adata.X = np.log1p(np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X) / 10.0)
        adata.write_h5ad(tmp_path / "layered.h5ad")
        scvi.model.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
        observed = _train(adata, tmp_path / "observed", gene_likelihood="nb")
        latent = _train(adata, tmp_path / "latent", gene_likelihood="nb", use_observed_lib_size=False)
    for folder in (observed, latent):
        cli("convert", "--from", "scvi", folder, "-o", folder.with_suffix(".safetensors"))
    inspected = json.loads(cli("inspect", observed.with_suffix(".safetensors"), "--json").stdout)
    assert inspected["model"]["data_layer"] == "counts"
    out = json.loads(cli("elbo", observed.with_suffix(".safetensors"), tmp_path / "layered.h5ad", "-k", 20, "--json").stdout)
    assert out["data"]["layer"] == "counts" and out["data"]["domain"] == {"domain": "counts"}
    refused = cli("elbo", observed.with_suffix(".safetensors"), tmp_path / "layered.h5ad", "--layer", "X", code=2)
    assert "non-negative integers" in refused.stderr
    compared = json.loads(cli("compare", observed.with_suffix(".safetensors"), latent.with_suffix(".safetensors"),
                              tmp_path / "layered.h5ad", "-k", 20, "--json").stdout)
    assert any("log p(x | batch, library size)" in note and "log p(x | batch)" in note for note in compared["notes"])
    assert not compared["differences"]


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"gene_likelihood": "normal"}, "gene_likelihood='normal'"),
        ({"batch_representation": "embedding"}, "batch_representation='embedding'"),
    ],
)
def test_what_format_1_cannot_hold_is_refused_by_name(cells, tmp_path, options, phrase):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.settings.seed = 0
        model = scvi.model.SCVI(cells["adata"], **options)
        model.save(str(tmp_path / "m"), overwrite=True)  # untrained: the refusal reads only the structure
    result = cli("convert", "--from", "scvi", tmp_path / "m", "-o", tmp_path / "m.safetensors", code=2)
    assert phrase in result.stderr and result.stderr.splitlines()[-1].startswith("vaeeval: error:")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_folder_without_a_model_is_one_line_before_anything_is_loaded(tmp_path):
    result = cli("convert", "--from", "scvi", tmp_path, "-o", tmp_path / "m.safetensors", code=2)
    assert result.stderr.count("\n") == 1 and "not a folder SCVI.save wrote (it has no model.pt)" in result.stderr


def _save_other(folder: Path, name: str) -> Path:
    """An untrained SCANVI (from an SCVI) or TOTALVI saved as scvi-tools saves it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.settings.seed = 0
        adata = scvi.data.synthetic_iid()
        if name == "SCANVI":
            scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
            model = scvi.model.SCANVI.from_scvi_model(scvi.model.SCVI(adata), unlabeled_category="Unknown")
        else:
            scvi.model.TOTALVI.setup_anndata(adata, batch_key="batch", protein_expression_obsm_key="protein_expression")
            model = scvi.model.TOTALVI(adata)
        model.save(str(folder), overwrite=True)
    return folder


@pytest.mark.parametrize(
    ("name", "way"),
    [
        ("SCANVI", "convert the SCVI model that SCANVI.from_scvi_model started from; SCANVI's cell label is a second latent "
                   "variable, which format 1 cannot hold"),
        ("TOTALVI", "TOTALVI's protein counts have a likelihood (a mixture of two negative binomials) and a background latent "
                    "of their own, which format 1 cannot hold"),
    ],
)
def test_other_model_classes_are_refused_by_the_name_in_their_saved_registry_before_scvi_tools_runs(tmp_path, name, way, monkeypatch):
    folder = _save_other(tmp_path / name.lower(), name)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr("torch.load", no_unpickling)
    result = cli("convert", "--from", "scvi", folder, "-o", tmp_path / "m.safetensors", code=2)
    assert result.stderr == (f"vaeeval: error: convert --from scvi: {folder} holds a {name} model (its saved registry says so); "
                             f"vaeeval converts SCVI models: {way}\n")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_model_pt_without_a_class_name_is_refused_without_unpickling(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"model_state_dict": {}, "attr_dict": {"registry_": {}}}, tmp_path / "m" / "model.pt")
    result = cli("convert", "--from", "scvi", tmp_path / "m", "-o", tmp_path / "m.safetensors", code=2)
    assert result.stderr == (f"vaeeval: error: {tmp_path / 'm'}: its model.pt names no model class vaeeval can read without "
                             "unpickling it (no registry model_name); vaeeval reads the folders SCVI.save writes\n")
