"""Densities vs probabilities: when continuous models are scored on bins, and what the numbers say."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from torch import nn

from vaeeval import VaeevalError, evaluate, save_model
from vaeeval.cli import main
from vaeeval.estimators.importance.scoring import choose_scoring
from vaeeval.format.domains import Domain
from vaeeval.format.likelihoods import likelihood_from_spec

GAUSSIAN = likelihood_from_spec({"family": "gaussian", "sigma": 1.0}, {}, (4,))
CATEGORICAL = likelihood_from_spec({"family": "categorical", "levels": 17}, {}, (4,))


@pytest.mark.parametrize(
    ("likelihood", "detected", "declared", "options", "measure", "levels"),
    [
        (GAUSSIAN, Domain("real"), None, {}, "density", None),
        (GAUSSIAN, Domain("unit_interval"), None, {}, "density", None),
        (GAUSSIAN, Domain("binary"), None, {}, "probability", 2),
        (GAUSSIAN, Domain("discrete", 17), None, {}, "probability", 17),
        (GAUSSIAN, Domain("binary"), Domain("discrete", 17), {}, "probability", 17),  # the model's grid first
        (GAUSSIAN, Domain("discrete", 17), None, {"density": True}, "density", None),
        (GAUSSIAN, Domain("discrete", 5), None, {"discretize": 17}, "probability", 17),  # 4 divides 16
        (CATEGORICAL, Domain("discrete", 17), None, {}, "probability", None),
        (CATEGORICAL, Domain("discrete", 17), None, {"density": True}, "probability", None),
    ],
)
def test_scoring_choice(likelihood, detected, declared, options, measure, levels):
    scoring = choose_scoring(likelihood, detected, declared, **options)
    assert (scoring.measure, scoring.levels) == (measure, levels)


@pytest.mark.parametrize(
    ("likelihood", "detected", "options", "phrase"),
    [
        (GAUSSIAN, Domain("discrete", 17), {"discretize": 5, "density": True}, "contradict"),
        (GAUSSIAN, Domain("unit_interval"), {"discretize": 17}, "not on the grid of 17 levels k/16"),
        (GAUSSIAN, Domain("discrete", 17), {"discretize": 5}, "not on the grid of 5 levels k/4"),
        (CATEGORICAL, Domain("discrete", 17), {"discretize": 5}, "own event is one of 17 levels"),
    ],
)
def test_scoring_refuses_what_cannot_be_meant(likelihood, detected, options, phrase):
    with pytest.raises(VaeevalError, match=phrase):
        choose_scoring(likelihood, detected, None, **options)


def _constant_gaussian(path, mean: np.ndarray, sigma: float):
    """A Gaussian decoder that ignores z: log p(x|z) is the same for every sample."""
    dims = mean.size
    decoder = nn.Sequential(linear_const(mean))
    encoder = nn.Sequential(nn.Linear(dims, 2))
    return save_model(path, encoder, decoder, likelihood={"family": "gaussian", "sigma": sigma},
                      input_shape=[dims], latent_dim=1)


def linear_const(bias: np.ndarray) -> nn.Linear:
    layer = nn.Linear(1, bias.size)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


def test_gaussian_model_on_binary_data_scores_the_split_at_one_half(tmp_path):
    mean = np.array([0.2, 0.7, -1.0, 2.5, 0.5], dtype=np.float32)
    sigma = 0.4
    model = _constant_gaussian(tmp_path / "g.safetensors", mean, sigma)
    x = (np.random.default_rng(0).random((9, 5)) < 0.5).astype(np.float32)
    result = evaluate(model, x, samples=16)
    t = (0.5 - mean.astype(np.float64)) / sigma
    expected = np.where(x == 0, stats.norm.logcdf(t), stats.norm.logsf(t)).sum(axis=1)
    np.testing.assert_allclose(result.points.recon, expected, rtol=1e-9)
    assert result.measure == "probability" and result.scoring.levels == 2
    density = evaluate(model, x, samples=16, density=True)
    np.testing.assert_allclose(density.points.recon, stats.norm.logpdf(x, mean, sigma).sum(axis=1), rtol=1e-5)
    assert density.measure == "density"


def test_dequantized_bits_per_dim_for_a_density_on_discrete_data(tmp_path):
    mean = np.full(4, 0.5, dtype=np.float32)
    model = _constant_gaussian(tmp_path / "g.safetensors", mean, 0.1)
    x = (np.random.default_rng(1).integers(0, 17, (6, 4)) / 16).astype(np.float32)
    result = evaluate(model, x, samples=8, density=True)
    expected = -(result.points.iwae + 4 * math.log(1 / 16)) / (4 * math.log(2))
    assert result.summary.dequantized_bits_per_dim.mean == pytest.approx(expected.mean())
    assert evaluate(model, x, samples=8).summary.dequantized_bits_per_dim is None  # bins: a real probability


def test_cli_flags_choose_the_measure(tmp_path):
    model = _constant_gaussian(tmp_path / "g.safetensors", np.full(4, 0.5, dtype=np.float32), 0.2)
    path = tmp_path / "grey.npy"
    np.save(path, (np.random.default_rng(2).integers(0, 17, (6, 4)) / 16).astype(np.float32))

    def summary(*options):
        result = CliRunner().invoke(main, ["elbo", str(model.path), str(path), "-k", "4", "--json", *options])
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    auto = summary()
    assert auto["summary"]["measure"] == "probability" and auto["summary"]["scoring"]["levels"] == 17
    assert auto["data"]["domain"] == {"domain": "discrete", "levels": 17}
    forced = summary("--density")
    assert forced["summary"]["measure"] == "density" and "dequantized_bits_per_dim" in forced["summary"]
    coarse = summary("--discretize", "17")
    assert coarse["summary"]["iwae"] == auto["summary"]["iwae"]
    refused = CliRunner().invoke(main, ["elbo", str(model.path), str(path), "-k", "4", "--discretize", "5"])
    assert refused.exit_code == 2 and "not on the grid of 5 levels k/4" in refused.stderr
