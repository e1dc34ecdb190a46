"""The evaluation loop: reproducible bit for bit, chunked, consistent with its summary; per-point diagnostics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES, LOG_2PI, PPCA, arviz_khat, family_data
from scipy.special import logsumexp
from torch import nn

from vaeeval import VaeevalError, evaluate, load_data, save_model
from vaeeval.core.rng import standard_normal
from vaeeval.estimators.importance.evaluate import chunk_size_for
from vaeeval.estimators.weights import BLOCK
from vaeeval.results.numbers import mean_and_stderr
from vaeeval.results.psis import reliability_threshold

METRICS = ("elbo", "recon", "kl", "iwae")


def _arrays(result):
    return {name: getattr(result.points, name) for name in METRICS}


@pytest.mark.parametrize(("batch_size", "chunk_size"), [(1, BLOCK), (7, 3 * BLOCK), (23, 1024)])
def test_same_seed_same_numbers_whatever_batch_and_chunk(bernoulli_model, binary_data, batch_size, chunk_size):
    data = load_data(binary_data, bernoulli_model)
    reference = evaluate(bernoulli_model, data, samples=300, seed=5, batch_size=100, chunk_size=2 * BLOCK)
    other = evaluate(bernoulli_model, data, samples=300, seed=5, batch_size=batch_size, chunk_size=chunk_size)
    for name, values in _arrays(reference).items():
        assert np.array_equal(values, getattr(other.points, name)), name


def test_limit_gives_the_same_points(bernoulli_model, binary_data):
    full = evaluate(bernoulli_model, load_data(binary_data, bernoulli_model), samples=100, batch_size=4)
    first = evaluate(bernoulli_model, load_data(binary_data, bernoulli_model, limit=5), samples=100)
    assert np.array_equal(full.points.iwae[:5], first.points.iwae)


def test_other_seed_other_numbers(bernoulli_model, binary_data):
    data = load_data(binary_data, bernoulli_model)
    a = evaluate(bernoulli_model, data, samples=50, seed=0)
    b = evaluate(bernoulli_model, data, samples=50, seed=1)
    assert not np.array_equal(a.points.iwae, b.points.iwae)
    assert np.array_equal(a.points.kl, b.points.kl)  # analytic: no noise


def test_chunk_is_bounded_by_memory_not_by_samples(bernoulli_model):
    small = chunk_size_for(bernoulli_model, batch_size=10, samples=10**4, max_memory=2**20)
    large = chunk_size_for(bernoulli_model, batch_size=10, samples=10**7, max_memory=2**20)
    assert small == large and small % BLOCK == 0
    assert chunk_size_for(bernoulli_model, batch_size=10, samples=10, max_memory=2**30) == BLOCK


def test_summary_is_mean_and_standard_error(bernoulli_model, binary_data):
    result = evaluate(bernoulli_model, load_data(binary_data, bernoulli_model), samples=64)
    iwae = result.points.iwae
    assert result.summary.iwae.mean == pytest.approx(iwae.mean())
    assert result.summary.iwae.stderr == pytest.approx(iwae.std(ddof=1) / math.sqrt(iwae.size))
    assert result.summary.bits_per_dim.mean == pytest.approx(-iwae.mean() / (6 * math.log(2)))
    np.testing.assert_allclose(result.points.elbo, result.points.recon - result.points.kl)
    assert mean_and_stderr(np.array([2.0])).stderr is None


def test_conv_decoder_splits_channels_into_parameter_blocks(tmp_path):
    """A conv decoder's output [P*C, H, W] is read as P blocks of C channels."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6))
    decoder = nn.Sequential(
        nn.Linear(3, 8 * 2 * 2), nn.Unflatten(1, (8, 2, 2)), nn.ELU(),
        nn.ConvTranspose2d(8, 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1),
    )
    model = save_model(tmp_path / "conv.safetensors", encoder, decoder, likelihood={"family": "gaussian"},
                       input_shape=[1, 8, 8], latent_dim=3)
    x = torch.rand(3, 1, 8, 8)
    params = model.decode(torch.zeros(3, 3))
    assert params.shape == (3, 2, 1, 8, 8)
    torch.testing.assert_close(params, decoder(torch.zeros(3, 3)).reshape(3, 2, 1, 8, 8))
    result = evaluate(model, x.numpy(), samples=64)
    assert np.isfinite(result.points.iwae).all()


def test_cuda_request_without_cuda_is_a_clear_error(bernoulli_model, binary_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(VaeevalError, match="no CUDA device"):
        evaluate(bernoulli_model, np.zeros((1, 6)), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_numbers(bernoulli_model, binary_data):
    data = load_data(binary_data, bernoulli_model)
    cpu = evaluate(bernoulli_model, data, samples=128)
    gpu = evaluate(bernoulli_model, data, samples=128, device="cuda")
    np.testing.assert_allclose(gpu.points.iwae, cpu.points.iwae, rtol=1e-5)


def test_overflowing_model_is_an_error_not_a_number(tmp_path):
    encoder = nn.Sequential(nn.Linear(2, 2))
    decoder = nn.Sequential(nn.Linear(1, 2))
    with torch.no_grad():
        encoder[0].weight.zero_()
        encoder[0].bias.copy_(torch.tensor([0.0, 1e4]))  # log-variance 1e4: std overflows
    model = save_model(tmp_path / "big.safetensors", encoder, decoder, likelihood={"family": "gaussian", "sigma": 1.0},
                       input_shape=[2], latent_dim=1)
    with pytest.raises(VaeevalError, match="point 0"):
        evaluate(model, np.zeros((2, 2)), samples=4)


@pytest.mark.parametrize(("likelihood", "outputs", "kind"), FAMILIES, ids=[f[0]["family"] + str(f[1]) for f in FAMILIES])
def test_every_family_and_activation_is_bitwise_batch_independent(tmp_path, likelihood, outputs, kind):
    """Every layer type and family, scored as densities and on bins: the same bits whatever the batching."""
    torch.manual_seed(0)
    dims = 12
    encoder = nn.Sequential(nn.Linear(dims, 16), nn.ELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 6))
    decoder = nn.Sequential(
        nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 16), nn.Sigmoid(),
        nn.Linear(16, 16), nn.LeakyReLU(0.1), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, outputs * dims),
    )
    model = save_model(tmp_path / "m.safetensors", encoder, decoder, likelihood=likelihood, input_shape=[dims], latent_dim=3)
    data = family_data(kind, 37, dims)
    for options in ({}, {"density": True}) if kind == "grey" else ({},):
        runs = [
            evaluate(model, data, samples=130, seed=3, batch_size=b, chunk_size=c, **options)
            for b, c in ((37, 1024), (1, 64), (5, 128), (16, 192))
        ]
        for other in runs[1:]:
            for name in ("elbo", "recon", "kl", "iwae", "ess", "khat"):
                assert np.array_equal(getattr(runs[0].points, name), getattr(other.points, name), equal_nan=True), name


_MEMORY_PROBE = """
import resource, sys
import numpy as np
from vaeeval import evaluate, load_data, load_model
model = load_model(sys.argv[1])
data = load_data(sys.argv[2], model, limit=8)
evaluate(model, data, samples=64, seed=1, batch_size=8, max_memory=2**16)  # warm-up: kernels, threads, allocator
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = evaluate(model, data, samples=int(sys.argv[3]), seed=1, batch_size=8, max_memory=2**16)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grown, result.settings.chunk_size, float(result.summary.iwae.mean))
"""


def test_memory_stays_bounded_at_a_large_k_under_a_tight_budget(bernoulli_model, binary_data):
    """K = 200 000 under a 64 KiB budget, in a fresh process whose peak RSS no earlier test has raised.

    Holding the samples of the 8 points at once would take 8 x 200 000 rows of the
    decoder's activations, log-densities and noise: over 300 MB. Streamed, the peak
    barely moves: only the per-point state and each point's largest log-weights
    (for k-hat, 3 sqrt(K) of them) depend on K.
    """
    import subprocess
    import sys

    samples = 200_000
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(bernoulli_model.path), str(binary_data), str(samples)],
        capture_output=True, text=True, check=True,
    )
    grown_kib, chunk_size, _ = done.stdout.split()
    held = 8 * samples * (2 * 16 + 6 + 2 * 8) * 4  # bytes: hidden and output activations, noise and latents, float32
    assert int(chunk_size) == BLOCK
    assert held > 300e6
    assert int(grown_kib) * 1024 < 30e6, f"peak RSS grew by {int(grown_kib) / 1024:.0f} MiB"


def test_a_tight_budget_changes_no_number(bernoulli_model, binary_data):
    data = load_data(binary_data, bernoulli_model, limit=8)
    tight = evaluate(bernoulli_model, data, samples=20_000, seed=1, batch_size=8, max_memory=2**16)
    roomy = evaluate(bernoulli_model, data, samples=20_000, seed=1, batch_size=8, max_memory=2**30)
    assert tight.settings.chunk_size == BLOCK < roomy.settings.chunk_size
    assert np.array_equal(tight.points.iwae, roomy.points.iwae)


# ---------------------------------------------------------------- per-point diagnostics


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
    np.testing.assert_allclose(result.points.khat, arviz_khat(log_w), atol=1e-3)  # float32 network noise
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
