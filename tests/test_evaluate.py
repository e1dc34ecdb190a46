"""The evaluation loop: reproducible bit for bit, chunked, and consistent with its summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vaeeval import VaeevalError, evaluate, load_data, save_model
from vaeeval.estimators import BLOCK
from vaeeval.evaluate import chunk_size_for, mean_and_stderr

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
