"""Can I trust this number? Standard errors, ESS, PSIS k-hat, K-convergence and latent health."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import LOG_2PI, PPCA, make_ppca
from scipy.special import logsumexp

from vaeeval import evaluate
from vaeeval.cli import main
from vaeeval.latents import latent_health
from vaeeval.psis import pareto_khat, reliability_threshold, top_size
from vaeeval.rng import standard_normal

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # arviz announces its refactor on import
    import arviz


def _arviz_khat(log_w: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return arviz.psislw(log_w.copy())[1]


def _top(log_w: np.ndarray) -> np.ndarray:
    return np.sort(log_w, axis=1)[:, -top_size(log_w.shape[1]):]


@pytest.mark.parametrize("samples", [100, 1000, 4000])
def test_khat_agrees_with_arviz(samples):
    rng = np.random.default_rng(samples)
    cases = {
        "lognormal": rng.normal(0, 1.5, (40, samples)),
        "pareto tail": np.log(rng.pareto(1.2, (40, samples)) + 1),
        "near-degenerate": rng.normal(0, 1e-6, (40, samples)),
        "spread beyond float range": rng.normal(0, 400, (40, samples)),
    }
    for name, log_w in cases.items():
        expected = _arviz_khat(log_w)
        found = pareto_khat(_top(log_w), samples)
        finite = np.isfinite(expected)
        np.testing.assert_allclose(found[finite], expected[finite], atol=1e-4, rtol=0, err_msg=name)
        assert np.array_equal(np.isinf(found), ~finite), name


def test_equal_weights_have_no_tail_and_need_no_division():
    with np.errstate(all="raise"):
        khat = pareto_khat(np.zeros((3, top_size(1000))), 1000)
    assert np.all(khat == -np.inf)  # arviz says inf: "cannot fit"; here there is nothing to fit
    assert not np.any(khat > reliability_threshold(1000))


def test_reliability_threshold():
    assert reliability_threshold(10_000) == 0.7
    assert reliability_threshold(100) == pytest.approx(0.5)
    assert reliability_threshold(1) == -math.inf


def _log_weights_by_hand(ppca: PPCA, model, x: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """log w for every point and sample, recomputed in numpy float64 from the same noise."""
    weight = model.encoder[0].weight.double().numpy()
    bias = model.encoder[0].bias.double().numpy()
    out = x @ weight.T + bias
    latent = ppca.W.shape[1]
    mean, var = out[:, :latent], np.exp(out[:, latent:])
    eps = standard_normal(seed, np.arange(len(x)), 0, samples, latent).numpy()
    z = (mean[:, None] + np.sqrt(var)[:, None] * eps).astype(np.float32).astype(np.float64)
    residual = x[:, None, :] - z @ ppca.W.T - ppca.b
    log_px_z = -0.5 * np.sum(residual**2, -1) / ppca.sigma**2 - ppca.dims * (math.log(ppca.sigma) + 0.5 * LOG_2PI)
    log_pz = -0.5 * np.sum(z**2, -1) - 0.5 * latent * LOG_2PI
    log_qz = -0.5 * np.sum((z - mean[:, None]) ** 2 / var[:, None] + np.log(var[:, None]) + LOG_2PI, -1)
    return log_px_z + log_pz - log_qz


def test_per_point_diagnostics_are_what_they_say(ppca: PPCA, tmp_path):
    samples, seed = 2000, 4
    model = ppca.save(tmp_path / "m.safetensors", mean_scale=0.7, log_var_shift=-0.6)
    x = ppca.sample(25, np.random.default_rng(1))
    result = evaluate(model, x, samples=samples, seed=seed, chunk_size=256)
    log_w = _log_weights_by_hand(ppca, model, x, samples, seed)
    w = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    ess = w.sum(1) ** 2 / (w**2).sum(1)
    np.testing.assert_allclose(result.points.iwae, logsumexp(log_w, axis=1) - math.log(samples), rtol=1e-6)
    np.testing.assert_allclose(result.points.ess, ess, rtol=1e-5)
    np.testing.assert_allclose(result.points.iwae_stderr, np.sqrt(1 / ess - 1 / samples), rtol=1e-5)
    np.testing.assert_allclose(result.points.khat, _arviz_khat(log_w), atol=1e-3)  # float32 network noise
    assert np.array_equal(result.points.unreliable, result.points.khat > reliability_threshold(samples))
    assert result.summary.diagnostics.unreliable == tuple(
        sorted(np.flatnonzero(result.points.unreliable), key=lambda i: -result.points.khat[i])
    )


def test_narrow_q_has_the_known_tail_index(ppca: PPCA, tmp_path):
    """q = N(m, r s2) for a Gaussian posterior N(m, s2): w has Pareto tail index k = 1 - r."""
    x = ppca.sample(16, np.random.default_rng(2))
    for ratio in (0.8, 0.5, 0.2):
        model = ppca.save(tmp_path / f"r{ratio}.safetensors", log_var_shift=math.log(ratio))
        khat = evaluate(model, x, samples=20_000, seed=1).points.khat
        assert abs(khat.mean() - (1 - ratio)) < 0.05, (ratio, khat.mean())


def test_too_narrow_encoder_is_flagged_and_the_exact_posterior_is_not(ppca: PPCA, tmp_path):
    x = ppca.sample(40, np.random.default_rng(3))
    exact = evaluate(ppca.save(tmp_path / "exact.safetensors"), x, samples=1000)
    assert not exact.points.unreliable.any() and exact.summary.diagnostics.unreliable == ()
    assert np.all(exact.points.iwae_stderr < 1e-6)
    assert np.all(exact.points.ess > 0.999 * 1000)
    narrow = evaluate(ppca.save(tmp_path / "narrow.safetensors", log_var_shift=math.log(0.1)), x, samples=1000)
    assert narrow.points.unreliable.mean() > 0.6  # true k = 0.9 > 0.67: most k-hats say so
    assert narrow.summary.diagnostics.share == narrow.points.unreliable.mean()
    # and the unreliable estimate is badly low, as PSIS warns
    assert np.mean(narrow.points.iwae - ppca.log_px(x)) < -0.3


def test_iwae_stderr_covers_the_truth_at_the_nominal_rate(ppca: PPCA, tmp_path):
    model = ppca.save(tmp_path / "m.safetensors", mean_scale=0.9, log_var_shift=0.3)
    x = ppca.sample(100, np.random.default_rng(5))
    truth = ppca.log_px(x)
    covered = []
    for seed in range(4):
        result = evaluate(model, x, samples=200, seed=seed)
        covered.append(np.abs(result.points.iwae - truth) <= 1.96 * result.points.iwae_stderr)
    rate = np.mean(covered)
    assert 0.9 <= rate <= 0.99, rate


def test_elbo_stderr_is_the_monte_carlo_error_of_the_reconstruction(ppca: PPCA, tmp_path):
    model = ppca.save(tmp_path / "m.safetensors", mean_scale=0.8)
    x = ppca.sample(10, np.random.default_rng(6))
    big = evaluate(model, x, samples=50_000, seed=9)
    small = [evaluate(model, x, samples=100, seed=seed) for seed in range(80)]
    spread = np.std([r.points.elbo for r in small], axis=0, ddof=1)
    predicted = np.mean([r.points.elbo_stderr for r in small], axis=0)
    # 80 replicates of a skewed (chi-square-like) term: each point's spread is known to ~15%, their mean to ~5%
    assert 0.9 < spread.mean() / predicted.mean() < 1.1
    np.testing.assert_allclose(predicted, spread, rtol=0.4)
    assert np.all(big.points.elbo_stderr < predicted)


def test_convergence_uses_nested_subsets_of_the_same_samples(ppca: PPCA, tmp_path):
    model = ppca.save(tmp_path / "m.safetensors", mean_scale=0.8, log_var_shift=-0.3)
    x = ppca.sample(12, np.random.default_rng(7))
    full = evaluate(model, x, samples=1000, seed=2, chunk_size=128)
    assert full.convergence.samples == (1, 10, 100, 1000)
    np.testing.assert_array_equal(full.convergence.iwae[:, -1], full.points.iwae)
    for column, k in enumerate(full.convergence.samples[:-1]):
        alone = evaluate(model, x, samples=k, seed=2)
        np.testing.assert_allclose(full.convergence.iwae[:, column], alone.points.iwae, rtol=1e-12, atol=1e-12)


def test_latent_health_on_a_model_with_a_collapsed_unit(tmp_path):
    """Three latent units, one with a zero decoder column: its posterior is the prior."""
    ppca = make_ppca(dims=6, latent=3)
    ppca.W[:, 2] = 0.0
    model = ppca.save(tmp_path / "m.safetensors")
    x = ppca.sample(1500, np.random.default_rng(8))
    result = evaluate(model, x, samples=4)
    health = latent_health(result.latent_means, result.latent_vars, result.points.kl, model.prior, seed=0)
    assert health.active.tolist() == [True, True, False]
    assert health.kl_per_dim[2] < 1e-6 and health.kl_per_dim[:2].min() > 0.1
    np.testing.assert_allclose(health.kl_per_dim.sum(), result.points.kl.mean(), rtol=1e-9)
    # true I(x; z) of a linear-Gaussian model under its exact posterior: 1/2 sum log(1 + s_j^2 / sigma^2)
    scales = np.sqrt(np.diag(ppca.W.T @ ppca.W))
    truth = 0.5 * np.sum(np.log1p(scales**2 / ppca.sigma**2))
    assert abs(health.mutual_information - truth) < 0.1, (health.mutual_information, truth)
    # q(z) is the prior when q is exact and x comes from the model: the aggregate KL is ~0
    assert abs(health.aggregate_kl) < 0.1
    assert "1 of 3 latent units are inactive" in health.warning and "units 2" in health.warning


def test_json_carries_the_diagnostics_contract(bernoulli_model, binary_data, tmp_path):
    result = CliRunner().invoke(
        main,
        ["elbo", str(bernoulli_model.path), str(binary_data), "-k", "100", "--json", "--convergence", "--diagnostics",
         "--plot", str(tmp_path / "p.png")],
    )
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    point = document["points"][0]
    assert {"elbo_stderr", "iwae_stderr", "ess", "khat", "unreliable"} <= set(point)
    assert isinstance(point["unreliable"], bool)
    diagnostics = document["summary"]["diagnostics"]
    assert set(diagnostics["unreliable"]) == {"count", "share", "khat_threshold", "points"}
    assert diagnostics["iwae_minus_elbo"]["mean"] > 0
    assert [step["samples"] for step in document["convergence"]] == [1, 10, 100]
    assert document["latents"]["active_units"] + len(document["latents"]["inactive"]) == 2
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = CliRunner().invoke(main, ["latents", str(bernoulli_model.path), str(binary_data), "-k", "20"])
    assert table.exit_code == 0 and "Latent units" in table.stdout and "I(x; z)" in table.stdout
    plain = json.loads(CliRunner().invoke(main, ["elbo", str(bernoulli_model.path), str(binary_data), "-k", "8", "--json"]).stdout)
    assert "convergence" not in plain and "latents" not in plain
