"""The evaluation loop: reproducible bit for bit, chunked, and consistent with its summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vaeeval import VaeevalError, evaluate, load_data, save_model
from vaeeval.estimators import BLOCK
from vaeeval.evaluate import chunk_size_for
from vaeeval.results import mean_and_stderr

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


FAMILIES = [
    ({"family": "bernoulli"}, 1, "binary"),
    ({"family": "gaussian", "sigma": 0.4}, 1, "grey"),
    ({"family": "gaussian"}, 2, "real"),
    ({"family": "laplace"}, 2, "grey"),
    ({"family": "continuous_bernoulli"}, 1, "grey"),
    ({"family": "categorical", "levels": 5}, 5, "grey"),
    ({"family": "discretized_logistic", "levels": 5}, 2, "grey"),
]


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
    rng = np.random.default_rng(0)
    data = {
        "binary": (rng.random((37, dims)) < 0.5),
        "grey": rng.integers(0, 5, (37, dims)) / 4,
        "real": rng.normal(size=(37, dims)),
    }[kind].astype(np.float32)
    for options in ({}, {"density": True}) if kind == "grey" else ({},):
        runs = [
            evaluate(model, data, samples=130, seed=3, batch_size=b, chunk_size=c, **options)
            for b, c in ((37, 1024), (1, 64), (5, 128), (16, 192))
        ]
        for other in runs[1:]:
            for name in ("elbo", "recon", "kl", "iwae", "ess", "khat"):
                assert np.array_equal(getattr(runs[0].points, name), getattr(other.points, name), equal_nan=True), name


def test_memory_stays_bounded_at_k_20000_under_a_tight_budget(bernoulli_model, binary_data):
    """K = 20000 under a 64 KiB working-memory budget: chunks of one block, numbers as with a big budget."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = load_data(binary_data, bernoulli_model, limit=8)
    tight = evaluate(bernoulli_model, data, samples=20_000, seed=1, batch_size=8, max_memory=2**16)
    assert tight.settings.chunk_size == BLOCK
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 50 * 1024  # KiB: nothing of size K was held (20000 x 8 points x 8 B per number is 1.2 MB a column)
    roomy = evaluate(bernoulli_model, data, samples=20_000, seed=1, batch_size=8, max_memory=2**30)
    assert roomy.settings.chunk_size > tight.settings.chunk_size
    assert np.array_equal(tight.points.iwae, roomy.points.iwae)
