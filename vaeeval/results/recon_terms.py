"""The reconstruction term as the loss a user trained with, plus the terms that make it a log-likelihood.

``recon`` = E_q[log p(x|z)] is a normalized log-likelihood in nats. Written out per family:

    Gaussian, fixed σ:  recon = −E_q[SSE_σ]/2 − Σ_d log σ_d − (D/2) log 2π,   SSE_σ = Σ_d (x_d − μ_d)²/σ_d²
    Laplace, fixed b:   recon = −E_q[L1_b] − Σ_d log 2b_d,                     L1_b = Σ_d |x_d − μ_d|/b_d
    Bernoulli:          recon = −E_q[BCE]        (binary cross-entropy with the logits, summed over dimensions)
    categorical:        recon = −E_q[CE]         (cross-entropy, summed over dimensions)

With a fixed scale the constant terms are known exactly, so the loss term is recon minus them:
the terms add up to recon by construction, and the loss (SSE, MSE per dimension, L1) is what the
decoder's means achieved under q, in the data's units. Training with w·SSE + KL is the ELBO of
σ² = 1/(2w): a sum-reduced MSE (w = 1) implied σ = 1/√2, a mean-reduced one (w = 1/D) σ = √(D/2),
beside the σ in the file and the σ ``vaeeval calibrate`` would fit, √(E[SSE]/D) over the points.
A decoder that outputs its own scale, the continuous Bernoulli, and any family scored on bins
are not split (``why`` says so).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from vaeeval.format.terms import DENSITY
from vaeeval.results.columns import finite
from vaeeval.results.numbers import mean_and_stderr

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _stat(values: np.ndarray) -> dict[str, float | None]:
    stat = mean_and_stderr(values)
    return {"mean": finite(stat.mean), "stderr": finite(stat.stderr)}


def _constant(value: float) -> dict[str, float]:
    return {"mean": value, "stderr": 0.0}


def recon_terms(recon: np.ndarray, model: Mapping[str, Any], measure: str) -> dict[str, Any]:
    """The ``summary.recon_terms`` record of an elbo document, from the points' ``recon`` and the model record.

    Args:
        recon: ``[N]`` per-point reconstruction terms.
        model: ``records.model_record`` of the model (its family, dims, and ``scale``).
        measure: what the numbers are (``density`` or ``probability``).
    """
    family, dims, scale = model["family"], model["dims"], model.get("scale")
    if family in ("gaussian", "laplace", "continuous_bernoulli") and measure != DENSITY:
        return {"family": family, "terms": None,
                "why": "scored as bin probabilities: each dimension is the log of its bin's mass, no loss plus constants "
                       "(--density gives the density's terms)"}
    if family == "bernoulli":
        return {"family": family, "form": "recon = -BCE, the binary cross-entropy with the logits summed over dimensions",
                "terms": [{"name": "-BCE", **_stat(recon)}], "loss": {"name": "BCE", **_stat(-recon)}}
    if family == "categorical":
        return {"family": family, "form": "recon = -CE, the cross-entropy of the levels summed over dimensions",
                "terms": [{"name": "-CE", **_stat(recon)}], "loss": {"name": "CE", **_stat(-recon)}}
    if family in ("gaussian", "laplace") and scale is not None:
        return _location_scale(recon, family, dims, scale)
    why = {
        "gaussian": "the decoder outputs its own sigma per dimension and point: log sigma_d(z) is inside the expectation",
        "laplace": "the decoder outputs its own scale per dimension and point: log b_d(z) is inside the expectation",
        "continuous_bernoulli": "-BCE plus the log-normalizers sum_d log C(lambda_d(z)), which vary with z",
    }.get(family, f"the {family} family is not written as a loss plus constants")
    return {"family": family, "terms": None, "why": why}


def _location_scale(recon: np.ndarray, family: str, dims: int, scale: Mapping[str, Any]) -> dict[str, Any]:
    shared, log_sum = scale.get("shared"), scale["log_sum"]
    if family == "gaussian":
        normalizer, constant = -log_sum, -dims * _HALF_LOG_2PI
        weighted = -2 * (recon - normalizer - constant)  # E_q SSE / sigma^2 per point
        loss = weighted * shared**2 if shared is not None else None  # E_q SSE in the data's units
        record = {
            "family": family,
            "form": "recon = -E[SSE]/(2 sigma^2) - sum_d log sigma_d - (D/2) log(2 pi)",
            "terms": [
                {"name": "-E[SSE]/(2 sigma^2)", **_stat(-weighted / 2)},
                {"name": "-sum_d log sigma_d", **_constant(normalizer)},
                {"name": "-(D/2) log(2 pi)", **_constant(constant)},
            ],
            "loss": None if loss is None else {"name": "SSE", **_stat(loss)},
            "mse_per_dim": None if loss is None else _stat(loss / dims),
            "implied_sigma": {
                "in_file": shared,
                "fitted_by_calibrate": None if loss is None else math.sqrt(max(float(np.mean(loss)), 0.0) / dims),
                "sum_reduced_mse": math.sqrt(0.5),
                "mean_reduced_mse": math.sqrt(dims / 2),
            },
        }
        if loss is None:
            record["note"] = "one sigma per dimension: the loss is the sigma-weighted SSE, E[sum_d (x_d - mu_d)^2 / sigma_d^2]"
            record["weighted_loss"] = {"name": "SSE/sigma^2", **_stat(weighted)}
        return record
    normalizer = -(log_sum + dims * math.log(2.0))
    weighted = -(recon - normalizer)  # E_q L1 / b per point
    loss = weighted * shared if shared is not None else None
    return {
        "family": family,
        "form": "recon = -E[L1]/b - sum_d log(2 b_d)",
        "terms": [{"name": "-E[L1]/b", **_stat(-weighted)}, {"name": "-sum_d log(2 b_d)", **_constant(normalizer)}],
        "loss": None if loss is None else {"name": "L1", **_stat(loss)},
        "mae_per_dim": None if loss is None else _stat(loss / dims),
    }
