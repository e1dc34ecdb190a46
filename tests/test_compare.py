"""vaeeval compare: ranks only comparable numbers, pairs the differences, says why when it won't."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import cli
from torch import nn

from vaeeval import evaluate, load_data, save_model
from vaeeval.analysis.compare import compare
from vaeeval.cli import main
from vaeeval.estimators.importance.evaluate import EvaluationOptions
from vaeeval.results.numbers import mean_and_stderr

DIMS = 4


def _model(path, likelihood, outputs, seed):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(DIMS, 8), nn.Tanh(), nn.Linear(8, 4))
    decoder = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, outputs * DIMS))
    return save_model(path, encoder, decoder, likelihood=likelihood, input_shape=[DIMS], latent_dim=2)


@pytest.fixture
def grey(tmp_path):
    path = tmp_path / "grey.npy"
    np.save(path, (np.random.default_rng(0).integers(0, 17, (30, DIMS)) / 16).astype(np.float32))
    return path


@pytest.fixture
def models(tmp_path):
    return [
        _model(tmp_path / "gaussian.safetensors", {"family": "gaussian", "sigma": 0.3}, 1, 0),
        _model(tmp_path / "categorical.safetensors", {"family": "categorical", "levels": 17}, 17, 1),
        _model(tmp_path / "cb.safetensors", {"family": "continuous_bernoulli"}, 1, 2),
    ]


def _run(models, data_path, **options):
    datasets = [load_data(data_path, m) for m in models]
    return compare(models, datasets, EvaluationOptions(samples=64, seed=3, **options)), datasets


def test_discrete_data_rescores_continuous_models_and_ranks_all(models, grey):
    comparison, datasets = _run(models, grey)
    assert [e.measure for e in comparison.evaluations] == ["probability"] * 3
    assert [e.scoring.levels for e in comparison.evaluations] == [17, None, 17]
    (group,) = comparison.groups
    assert group.ranked
    iwae = [e.summary.iwae.mean for e in comparison.evaluations]
    assert list(group.members) == sorted(range(3), key=lambda i: -iwae[i])
    assert any("scored as the probability of each value's bin on 17 levels" in n for n in comparison.notes)
    # same data, same seed: each column is exactly what evaluate gives alone
    alone = evaluate(models[0], datasets[0], samples=64, seed=3)
    assert np.array_equal(alone.points.iwae, comparison.evaluations[0].points.iwae)


def test_paired_standard_error_is_the_direct_computation(models, grey):
    comparison, _ = _run(models, grey)
    best = comparison.groups[0].members[0]
    for difference in comparison.differences:
        a = comparison.evaluations[best].points.iwae
        b = comparison.evaluations[difference.model].points.iwae
        d = a - b
        assert difference.best == best
        assert difference.paired.mean == pytest.approx(d.mean())
        assert difference.paired.stderr == pytest.approx(np.std(d, ddof=1) / math.sqrt(d.size))
        se_a = np.std(a, ddof=1) / math.sqrt(a.size)
        se_b = np.std(b, ddof=1) / math.sqrt(b.size)
        assert difference.unpaired_stderr == pytest.approx(math.hypot(se_a, se_b))


def test_paired_difference_is_the_summary_statistic_of_the_per_point_differences(models, grey):
    """The same mean_and_stderr every summary uses, of best - other point by point: equal, not just close."""
    comparison, _ = _run(models, grey)
    assert len(comparison.differences) == 2
    for difference in comparison.differences:
        best, other = (comparison.evaluations[i].points.iwae for i in (difference.best, difference.model))
        assert difference.paired == mean_and_stderr(best - other)


def test_paired_error_is_smaller_when_points_vary_together(tmp_path, grey):
    """Two nearly identical models: per-point scores move together, their difference barely varies."""
    a = _model(tmp_path / "a.safetensors", {"family": "gaussian", "sigma": 0.3}, 1, 0)
    b = _model(tmp_path / "b.safetensors", {"family": "gaussian", "sigma": 0.31}, 1, 0)
    comparison, _ = _run([a, b], grey)
    (difference,) = comparison.differences
    assert difference.paired.stderr < 0.2 * difference.unpaired_stderr


def test_density_on_discrete_data_is_not_ranked_against_probabilities(models, grey):
    comparison, _ = _run(models, grey, density=True)
    measures = {g.measure: g for g in comparison.groups}
    assert not measures["density"].ranked and measures["probability"].ranked
    assert comparison.rank(0) is None and comparison.rank(1) == 1
    assert any("Not ranked against each other" in n and "drop --density" in n for n in comparison.notes)
    assert any("densities of discrete data" in n for n in comparison.notes)


def test_continuous_data_ranks_densities_but_not_against_a_discrete_model(tmp_path):
    fine = 5000  # more levels than vaeeval looks for a grid in: the data reads as continuous
    path = tmp_path / "fine.npy"
    np.save(path, np.random.default_rng(1).integers(0, fine, (40, DIMS)) / (fine - 1))
    models = [
        _model(tmp_path / "g1.safetensors", {"family": "gaussian", "sigma": 0.3}, 1, 0),
        _model(tmp_path / "g2.safetensors", {"family": "laplace", "scale": 0.3}, 1, 1),
        _model(tmp_path / "cat.safetensors", {"family": "categorical", "levels": fine}, fine, 2),
    ]
    comparison, datasets = _run(models, path)
    assert datasets[0].domain.kind == "unit_interval"
    groups = {g.measure: g for g in comparison.groups}
    assert groups["density"].ranked and set(groups["density"].members) == {0, 1}
    (note,) = [n for n in comparison.notes if "Not ranked against each other" in n]
    assert note.endswith(".") and ". " not in note  # one sentence


def test_compare_cli_json_and_table(models, grey):
    paths = [str(m.path) for m in models]
    result = CliRunner().invoke(main, ["compare", *paths, str(grey), "-k", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["schema"] == "vaeeval.compare/1"
    assert [m["model"]["path"] for m in document["models"]] == paths
    assert sorted(m["rank"] for m in document["models"]) == [1, 2, 3]
    assert {"mean", "stderr", "unpaired_stderr", "model", "versus"} <= set(document["differences"][0])
    assert document["rankings"][0]["ranked"] and len(document["rankings"][0]["order"]) == 3
    assert all(m["summary"]["measure"] == "probability" for m in document["models"])
    table = CliRunner().invoke(main, ["compare", *paths, str(grey), "-k", "32"]).stdout
    for phrase in ("Models", "Estimates", "probability (17 bins)", "best", "± paired"):
        assert phrase in table


def test_compare_needs_two_models(models, grey):
    result = CliRunner().invoke(main, ["compare", str(models[0].path), str(grey)])
    assert result.exit_code == 2 and "at least two models" in result.stderr and result.stderr.count("\n") == 1


def test_compare_ranks_by_ais_with_paired_differences(models, grey):
    from vaeeval.estimators.annealing.ais import AISOptions

    datasets = [load_data(grey, m) for m in models]
    annealing = AISOptions(steps=4, leapfrog=2, chains=3)
    comparison = compare(models, datasets, EvaluationOptions(samples=16, seed=3), annealing=annealing)
    assert comparison.metric == "ais"
    ranked = [g for g in comparison.groups if g.ranked][0]
    means = [comparison.evaluations[i].summary.ais.mean for i in ranked.members]
    assert means == sorted(means, reverse=True)
    for difference in comparison.differences:
        best, other = comparison.evaluations[difference.best], comparison.evaluations[difference.model]
        assert difference.paired == mean_and_stderr(best.points.ais - other.points.ais)


def test_compare_estimator_ais_on_the_command_line(models, grey):
    import jsonschema

    from vaeeval.results.schemas import schema

    paths = [m.path for m in models]
    out = cli("compare", *paths, grey, "-k", "16", "--estimator", "ais", "--steps", "3", "--chains", "2",
              "--leapfrog", "1", "--json")
    document = json.loads(out.stdout)
    jsonschema.Draft202012Validator(schema("vaeeval.compare/1")).validate(document)
    assert document["estimator"] == "ais" and document["settings"]["steps"] == 3
    assert all(d["metric"] == "ais" for d in document["differences"])
    assert "ais" in document["models"][0]["points"][0]
