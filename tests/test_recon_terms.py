"""summary.recon_terms for every family (results/recon_terms.py) and --explain's second pass (estimators/importance/explain.py).

For each family: the terms add up to recon to float64 rounding, per data set and per point; the
statistic the split derives (recon minus the other terms) agrees with the one computed directly
to the float32 rounding of the evaluation's log-likelihoods; the second pass's statistics equal
references (torch.nn.functional's losses, scipy.stats' densities) on the same keyed draws; they do
not depend on the batch or chunk size; and the CLI's JSON validates and its table renders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cli
from scipy import stats
from scipy.special import expit, log_expit
from torch import nn

from vaeeval import EvaluationOptions, Evaluator, save_model
from vaeeval.core.rng import standard_normal
from vaeeval.estimators.importance.explain import explain, loss_statistics
from vaeeval.results.numbers import Evaluation
from vaeeval.results.recon_terms import LossStatistics, recon_terms
from vaeeval.results.records import model_record
from vaeeval.results.schemas import schema

DIMS, LATENT, POINTS, SAMPLES, SEED = 6, 2, 20, 100, 3
LEVELS = 5

FAMILIES = {  # name: (likelihood block, decoder outputs per dimension, data)
    "bernoulli": ({"family": "bernoulli"}, 1, "binary"),
    "categorical": ({"family": "categorical", "levels": LEVELS}, LEVELS, "grid"),
    "gaussian, fixed sigma": ({"family": "gaussian", "sigma": 0.7}, 1, "real"),
    "gaussian, sigma per dimension": ({"family": "gaussian", "log_sigma": torch.linspace(-1.0, 0.5, DIMS)}, 1, "real"),
    "gaussian, sigma_d(z)": ({"family": "gaussian"}, 2, "real"),
    "laplace, fixed b": ({"family": "laplace", "scale": 0.6}, 1, "real"),
    "laplace, b_d(z)": ({"family": "laplace"}, 2, "real"),
    "continuous_bernoulli": ({"family": "continuous_bernoulli"}, 1, "unit"),
    "gaussian on bins": ({"family": "gaussian", "sigma": 0.3}, 1, "grid"),
    "laplace on bins": ({"family": "laplace"}, 2, "grid"),
    "continuous_bernoulli on bins": ({"family": "continuous_bernoulli"}, 1, "grid"),
    "discretized_logistic": ({"family": "discretized_logistic", "levels": LEVELS}, 2, "grid"),
}
SPLIT_BY_THE_PASS = [name for name in FAMILIES if name.endswith(("(z)", "bins", "bernoulli", "logistic", "dimension"))
                     and name != "bernoulli"]


@dataclass
class Explained:
    name: str
    model: object
    data: np.ndarray
    path: object
    evaluator: Evaluator
    evaluation: Evaluation
    record: dict
    statistics: LossStatistics | None
    terms: dict


def _data(kind: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    return {
        "binary": lambda: (rng.random((POINTS, DIMS)) < 0.4),
        "grid": lambda: rng.integers(0, LEVELS, (POINTS, DIMS)) / (LEVELS - 1),
        "real": lambda: rng.normal(size=(POINTS, DIMS)),
        "unit": lambda: rng.random((POINTS, DIMS)),
    }[kind]().astype(np.float32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def explained(request, tmp_path_factory) -> Explained:
    likelihood, params, kind = FAMILIES[request.param]
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(DIMS, 16), nn.Tanh(), nn.Linear(16, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, 16), nn.Tanh(), nn.Linear(16, params * DIMS))
    path = tmp_path_factory.mktemp("recon_terms") / "model.safetensors"
    model = save_model(path, encoder, decoder, likelihood=likelihood, input_shape=[DIMS], latent_dim=LATENT)
    data = _data(kind)
    evaluator = Evaluator(model, data, EvaluationOptions(samples=SAMPLES, seed=SEED, batch_size=7))
    evaluation = evaluator.evaluate()
    record = model_record(model)
    statistics = explain(evaluator, evaluation, record)
    terms = recon_terms(evaluation.points.recon, record, evaluation.scoring, statistics)
    return Explained(request.param, model, data, path, evaluator, evaluation, record, statistics, terms)


def _per_point(terms: dict) -> np.ndarray:
    """Each point's terms added up: the per-point lists, and the constants."""
    total = np.zeros(len(next(iter(terms["points"].values()))))
    for term in terms["terms"]:
        total = total + (np.array(terms["points"][term["name"]]) if term["name"] in terms["points"] else term["mean"])
    return total


def test_the_terms_add_up_to_recon_per_data_set_and_per_point(explained):
    terms, recon = explained.terms, explained.evaluation.points.recon
    assert terms["terms"] is not None, terms.get("why")
    assert (explained.statistics is not None) == (explained.name in SPLIT_BY_THE_PASS)  # the pass runs only where needed
    scale = sum(abs(term["mean"]) for term in terms["terms"])
    assert sum(term["mean"] for term in terms["terms"]) == pytest.approx(float(np.mean(recon)), rel=1e-12, abs=1e-13 * scale)
    per_point = _per_point(terms)
    assert per_point == pytest.approx(recon, rel=1e-12, abs=1e-13 * scale)


def _derived_and_direct(explained: Explained) -> tuple[np.ndarray, np.ndarray]:
    """What the split derives as recon minus the other terms, and the same statistic from the second pass."""
    terms, values = explained.terms, explained.statistics.values
    if explained.record["family"] == "continuous_bernoulli":
        return np.array(terms["points"]["BCE"]), values["loss"]
    return np.array(terms["points"][terms["weighted_loss"]["name"]]), values["weighted_loss"]


@pytest.mark.parametrize("explained", [n for n in SPLIT_BY_THE_PASS if "bins" not in n and "logistic" not in n], indirect=True)
def test_the_derived_loss_term_is_the_directly_computed_statistic(explained):
    derived, direct = _derived_and_direct(explained)
    # the evaluation's log-densities are float32 per element, the pass's statistics float64
    assert derived == pytest.approx(direct, rel=1e-5, abs=1e-5)


def _decoded(explained: Explained) -> tuple[np.ndarray, np.ndarray]:
    """The decoder's outputs ``[N, K, P, D]`` on the evaluation's keyed draws, drawn here without its helpers, and x ``[N, 1, D]``."""
    model, x = explained.model, torch.as_tensor(explained.data)
    with torch.inference_mode():
        mean, log_var = model.encode(x)
        eps = standard_normal(SEED, np.arange(POINTS), 0, SAMPLES, LATENT)
        z = (mean.double()[:, None] + (0.5 * log_var.double()).exp()[:, None] * eps).float()
        params = model.decode(z.reshape(-1, LATENT)).reshape(POINTS, SAMPLES, -1, DIMS)
    return params.double().numpy(), explained.data.astype(np.float64)[:, None]


def _scale(explained: Explained, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The location, the scale and its log as evaluated: a density's in float32, bins' in float64; the decoder's own log-scale."""
    likelihood, binned = explained.model.likelihood, explained.evaluation.scoring.levels is not None
    if likelihood.scale is None:
        log_scale = params[:, :, 1]
        return params[:, :, 0], np.exp(log_scale if binned else log_scale.astype(np.float32)).astype(np.float64), log_scale
    scale = torch.as_tensor(likelihood.scale, dtype=torch.float64 if binned else torch.float32).double().numpy()
    scale = np.broadcast_to(scale, params[:, :, 0].shape)
    return params[:, :, 0], scale, np.log(scale)


def _mean(values: np.ndarray) -> np.ndarray:
    """Per point, the mean over the samples of the sum over dimensions."""
    return values.sum(-1).mean(-1)


def _log_c(eta: np.ndarray) -> np.ndarray:
    """log C(eta) of the continuous Bernoulli from its definition, 2 artanh(1 - 2 lambda) / (1 - 2 lambda)."""
    lam = expit(eta)
    return np.log(2 * np.arctanh(1 - 2 * lam) / (1 - 2 * lam))


def _references(explained: Explained) -> dict[str, np.ndarray]:
    params, x = _decoded(explained)
    family = explained.record["family"]
    width = 1 / (LEVELS - 1)
    if family in ("gaussian", "laplace"):
        location, scale, log_scale = _scale(explained, params)
        loss = F.mse_loss if family == "gaussian" else F.l1_loss
        residual = torch.as_tensor(x).expand(location.shape)
        references = {
            "loss": _mean(loss(torch.as_tensor(location), residual, reduction="none").numpy()),
            "log_scale": _mean(log_scale),
        }
        density = stats.norm(location, scale) if family == "gaussian" else stats.laplace(location, scale)
        references["log_density_width"] = _mean(density.logpdf(x) + math.log(width))
        return references
    if family == "continuous_bernoulli":
        eta = params[:, :, 0]
        bce = F.binary_cross_entropy_with_logits(torch.as_tensor(eta), torch.as_tensor(x).expand(eta.shape), reduction="none")
        return {"loss": _mean(bce.numpy()), "log_normalizer": _mean(_log_c(eta)),
                "log_density_width": _mean(x * eta + log_expit(-eta) + _log_c(eta) + math.log(width))}
    location, scale = params[:, :, 0], np.exp(params[:, :, 1])
    return {"log_density_width": _mean(stats.logistic(location, scale).logpdf(x) + math.log(width))}


@pytest.mark.parametrize("explained", SPLIT_BY_THE_PASS, indirect=True)
def test_the_second_pass_is_the_reference_on_the_same_draws(explained):
    references = _references(explained)
    found = explained.statistics.values
    assert set(found) >= set(references) - ({"log_density_width"} if explained.evaluation.scoring.levels is None
                                            and explained.record["family"] != "discretized_logistic" else set())
    for name, values in found.items():
        if name in references:
            assert values == pytest.approx(references[name], rel=1e-9, abs=1e-9), name
    if "bin_width" in explained.terms:
        assert explained.statistics.bin_width == 1 / (LEVELS - 1)


@pytest.mark.parametrize("explained", ["gaussian on bins"], indirect=True)
def test_recon_on_bins_is_the_log_of_each_bins_mass(explained):
    """The exact side of the split: scipy's log-CDFs over the bins (the outermost ones open), on the same draws."""
    params, x = _decoded(explained)
    location, scale, _ = _scale(explained, params)
    half = 0.5 / (LEVELS - 1)
    below, above = stats.norm.logcdf((x + half - location) / scale), stats.norm.logsf((x - half - location) / scale)
    inner = np.log(stats.norm.cdf((x + half - location) / scale) - stats.norm.cdf((x - half - location) / scale))
    mass = np.where(x == 0, below, np.where(x == 1, above, inner))
    assert explained.evaluation.points.recon == pytest.approx(_mean(mass), rel=1e-9)


@pytest.mark.parametrize("explained", ["gaussian, sigma_d(z)", "discretized_logistic"], indirect=True)
def test_the_statistics_do_not_depend_on_the_batch_or_chunk_size(explained):
    other = Evaluator(explained.model, explained.data, EvaluationOptions(samples=SAMPLES, seed=SEED, batch_size=3, chunk_size=128))
    again = loss_statistics(other, explained.evaluation.points.index)
    assert set(again.values) == set(explained.statistics.values)
    for name, values in again.values.items():
        np.testing.assert_array_equal(values, explained.statistics.values[name])


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("explained", ["gaussian, sigma_d(z)", "discretized_logistic"], indirect=True)
def test_elbo_explain_in_json_validates_and_without_it_says_what_computes_it(explained, tmp_path):
    np.save(tmp_path / "x.npy", explained.data)
    common = (explained.path, tmp_path / "x.npy", "-k", SAMPLES, "--seed", SEED, "--json")
    without = json.loads(cli("elbo", *common).stdout)["summary"]["recon_terms"]
    assert without["terms"] is None and "--explain computes it with a second pass" in without["why"]
    document = json.loads(cli("elbo", *common, "--explain").stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.elbo/1")).validate(document)
    assert document["summary"]["recon_terms"] == json.loads(json.dumps(explained.terms))
    assert len(next(iter(document["summary"]["recon_terms"]["points"].values()))) == len(document["points"])


@pytest.mark.parametrize("explained", ["laplace on bins", "continuous_bernoulli"], indirect=True)
def test_elbo_explain_draws_the_split_as_a_table(explained, tmp_path):
    np.save(tmp_path / "x.npy", explained.data)
    table = cli("elbo", explained.path, tmp_path / "x.npy", "-k", 16, "--explain").stdout
    assert "recon, written out" in table
    for term in explained.terms["terms"]:
        assert term["name"][:20] in table
    assert ("bins: 5 levels, width w = 0.2500" in table) == ("bin_width" in explained.terms)
