"""vaeeval.results.latents: which latent units the encoder uses, and how much q(z|x) knows about x."""

from __future__ import annotations

import numpy as np
from conftest import make_ppca

from vaeeval import evaluate
from vaeeval.results.latents import latent_health


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
