"""Shared builders: tiny models written with ``save_model`` into tmp_path, exact answers, and a CLI runner.

``ppca`` builds a linear-Gaussian VAE (probabilistic PCA, Tipping & Bishop 1999)
whose decoder has orthogonal columns, so its posterior is a diagonal Gaussian
and everything has a closed form.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import settings
from torch import nn

from vaeeval import Model, save_model
from vaeeval.cli import main

# property tests draw the same examples on every run: CI is reproducible, failures replayable
settings.register_profile("vaeeval", derandomize=True, deadline=None)
settings.load_profile("vaeeval")


def linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """An ``nn.Linear`` holding exactly these weights."""
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return layer


@dataclass
class PPCA:
    """x = W z + b + sigma * noise, z ~ N(0, I); W has orthogonal columns."""

    W: np.ndarray  # [D, L]
    b: np.ndarray  # [D]
    sigma: float

    @property
    def dims(self) -> int:
        return self.W.shape[0]

    def log_px(self, x: np.ndarray) -> np.ndarray:
        """Closed-form log N(x; b, W W^T + sigma^2 I), ``[N]``."""
        from scipy.stats import multivariate_normal

        cov = self.W @ self.W.T + self.sigma**2 * np.eye(self.dims)
        return multivariate_normal(self.b, cov).logpdf(x)

    def posterior(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior mean ``[N, L]`` and (diagonal) variance ``[L]``."""
        m = np.diag(self.W.T @ self.W) + self.sigma**2
        return (x - self.b) @ self.W / m, self.sigma**2 / m

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal((n, self.W.shape[1]))
        return z @ self.W.T + self.b + self.sigma * rng.standard_normal((n, self.dims))

    def encoder(self, mean_scale: float = 1.0, log_var_shift: float = 0.0) -> nn.Sequential:
        """A one-layer encoder giving the exact posterior, or a perturbed one."""
        m = np.diag(self.W.T @ self.W) + self.sigma**2
        latent = self.W.shape[1]
        weight = np.vstack([mean_scale * self.W.T / m[:, None], np.zeros((latent, self.dims))])
        bias = np.concatenate([-mean_scale * (self.W.T @ self.b) / m, np.log(self.sigma**2 / m) + log_var_shift])
        return nn.Sequential(linear(weight, bias))

    def save(self, path: Path, **encoder_options: float) -> Model:
        return save_model(
            path,
            self.encoder(**encoder_options),
            nn.Sequential(linear(self.W, self.b)),
            likelihood={"family": "gaussian", "sigma": self.sigma},
            input_shape=[self.dims],
            latent_dim=self.W.shape[1],
        )


def make_ppca(dims: int = 6, latent: int = 2, sigma: float = 0.5, seed: int = 0) -> PPCA:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    scales = np.linspace(2.0, 1.0, latent)
    W = (q[:, :latent] * scales).astype(np.float32).astype(np.float64)
    b = rng.normal(size=dims).astype(np.float32).astype(np.float64)
    return PPCA(W, b, sigma)


@pytest.fixture
def ppca() -> PPCA:
    return make_ppca()


def gaussian_kl_to_standard(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """KL(N(mean, diag var) || N(0, I)) per row."""
    return 0.5 * np.sum(var + mean**2 - 1.0 - np.log(var), axis=-1)


def tiny_bernoulli(path: Path, dims: int = 6, latent: int = 2, seed: int = 0) -> Model:
    """A small random MLP VAE with a Bernoulli decoder."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(dims, 16), nn.Tanh(), nn.Linear(16, 2 * latent))
    decoder = nn.Sequential(nn.Linear(latent, 16), nn.Tanh(), nn.Linear(16, dims))
    return save_model(
        path, encoder, decoder, likelihood={"family": "bernoulli"}, input_shape=[dims], latent_dim=latent,
        data={"domain": "binary"},
    )


@pytest.fixture
def bernoulli_model(tmp_path: Path) -> Model:
    return tiny_bernoulli(tmp_path / "bernoulli.safetensors")


@pytest.fixture
def binary_data(tmp_path: Path) -> Path:
    path = tmp_path / "binary.npy"
    np.save(path, (np.random.default_rng(1).random((23, 6)) < 0.4).astype(np.float32))
    return path


LOG_2PI = math.log(2 * math.pi)


def arviz_khat(log_w: np.ndarray) -> np.ndarray:
    """arviz's PSIS k-hat of each row of log-weights: the reference implementation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz announces its refactor on import
        import arviz

        return arviz.psislw(log_w.copy())[1]


@pytest.fixture
def second_model(tmp_path: Path) -> Model:
    """The ``bernoulli_model`` network with its output logits shifted by +1.5: clearly worse on the same data."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 6))
    with torch.no_grad():
        decoder[2].bias += 1.5
    return save_model(tmp_path / "other.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
                      input_shape=[6], latent_dim=2, data={"domain": "binary"})


def cli(*args: Any, code: int = 0) -> Result:
    """Run ``vaeeval`` in-process (stdout and stderr apart); its exit code must be ``code``."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, (result.exit_code, result.stderr, repr(result.exception))
    return result


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (a results file)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class OneDimensional:
    """A 1-D latent Bernoulli VAE with everything exact by quadrature on a fine grid."""

    model: Model
    encoder: nn.Sequential
    x: np.ndarray  # [N, D] binary, float64
    grid: np.ndarray  # [G] the latent grid
    step: float
    log_lik: np.ndarray  # [N, G] log p(x|z)
    log_prior: np.ndarray  # [G]
    log_joint: np.ndarray  # [N, G]
    log_px: np.ndarray  # [N]


def _mlp_logits(model_decoder: nn.Sequential, z: np.ndarray) -> np.ndarray:
    """The decoder evaluated in float64 with numpy (an independent implementation)."""
    first, last = model_decoder[0], model_decoder[2]
    w1, b1 = first.weight.detach().double().numpy(), first.bias.detach().double().numpy()
    w2, b2 = last.weight.detach().double().numpy(), last.bias.detach().double().numpy()
    return np.tanh(z[:, None] * w1[:, 0] + b1) @ w2.T + b2


def one_dimensional_bernoulli(tmp_path: Path, points: int = 25, dims: int = 8, encoder_shift: float = 0.0) -> OneDimensional:
    """A 1-D latent Bernoulli VAE, its data and exact log p(x); the encoder is fitted to the exact posterior
    moments (good, not exact), its mean shifted by ``encoder_shift``."""
    from scipy.special import log_expit, logsumexp

    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, dims))
    with torch.no_grad():
        decoder[0].weight.mul_(3.0)
        decoder[2].weight.mul_(3.0)

    grid = np.linspace(-12.0, 12.0, 24001)
    step = grid[1] - grid[0]
    logits = _mlp_logits(decoder, grid)  # [G, D]
    rng = np.random.default_rng(0)
    z_true = rng.standard_normal(points)
    x = (rng.random((points, dims)) < 1 / (1 + np.exp(-_mlp_logits(decoder, z_true)))).astype(np.float64)
    log_lik = x @ log_expit(logits).T + (1 - x) @ log_expit(-logits).T  # [N, G]
    log_prior = -0.5 * grid**2 - 0.5 * LOG_2PI
    log_joint = log_lik + log_prior
    log_px = logsumexp(log_joint, axis=1) + math.log(step)

    post = np.exp(log_joint - log_px[:, None]) * step
    post_mean = post @ grid
    post_var = post @ grid**2 - post_mean**2
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, np.stack([post_mean + encoder_shift, np.log(post_var)], axis=1), rcond=None)
    encoder = nn.Sequential(linear(coef[:-1].T, coef[-1]))
    model = save_model(
        tmp_path / "latent1.safetensors", encoder, decoder, likelihood={"family": "bernoulli"},
        input_shape=[dims], latent_dim=1,
    )
    return OneDimensional(model, encoder, x, grid, step, log_lik, log_prior, log_joint, log_px)


# every likelihood family: its spec, decoder outputs per dimension, and the kind of data it scores
FAMILIES = [
    ({"family": "bernoulli"}, 1, "binary"),
    ({"family": "gaussian", "sigma": 0.4}, 1, "grey"),
    ({"family": "gaussian"}, 2, "real"),
    ({"family": "laplace"}, 2, "grey"),
    ({"family": "continuous_bernoulli"}, 1, "grey"),
    ({"family": "categorical", "levels": 5}, 5, "grey"),
    ({"family": "discretized_logistic", "levels": 5}, 2, "grey"),
]


def family_data(kind: str, points: int, dims: int) -> np.ndarray:
    """Data a family of ``FAMILIES`` scores: binary, grey levels k/4, or real numbers; float32."""
    rng = np.random.default_rng(0)
    return {
        "binary": (rng.random((points, dims)) < 0.5),
        "grey": rng.integers(0, 5, (points, dims)) / 4,
        "real": rng.normal(size=(points, dims)),
    }[kind].astype(np.float32)
