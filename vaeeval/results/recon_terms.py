"""The reconstruction term as the loss a user trained with, plus the terms that make it a log-likelihood.

``recon`` = E_q[log p(x|z)] is a normalized log-likelihood in nats. Written out per family
(sums over the D data dimensions; E over the K draws of q(z|x) the evaluation made):

    Gaussian, fixed σ:    recon = −E[SSE]/(2σ²) − Σ_d log σ_d − (D/2) log 2π               SSE = Σ_d (x_d − μ_d)²
    Gaussian, σ_d(z):     recon = −E[Σ_d (x_d − μ_d)²/(2σ_d²)] − E[Σ_d log σ_d] − (D/2) log 2π
    Laplace, fixed b:     recon = −E[L1]/b − Σ_d log 2b_d                                   L1 = Σ_d |x_d − μ_d|
    Laplace, b_d(z):      recon = −E[Σ_d |x_d − μ_d|/b_d] − E[Σ_d log 2b_d]
    Bernoulli:            recon = −E[BCE]        (binary cross-entropy with the logits)
    categorical:          recon = −E[CE]         (cross-entropy of the levels)
    continuous Bernoulli: recon = −E[BCE(x, λ)] + E[Σ_d log C(λ_d)]
    on bins (a continuous family scored as bin probabilities, and the discretized logistic):
                          recon = E[Σ_d log P(bin_d)] = E[Σ_d log(p(x_d|z) w)] + the difference,  w = 1/(L − 1)

With a fixed scale the constant terms are known exactly, so the loss term is recon minus them
and costs nothing. The other splits need per-sample numbers recon does not hold (E[Σ_d log σ_d(z)],
E[Σ_d log C(λ_d)], the density at the data): ``vaeeval elbo --explain`` computes them in a second
pass over the same keyed draws (``estimators/importance/explain.py``, ``LossStatistics`` here).
In every split the loss-bearing term (or, on bins, the difference) is recon minus the other terms,
so the terms add up to recon to float64 rounding; the statistic computed directly (the weighted
loss, BCE) agrees with it to the float32 rounding of the evaluation's log-likelihoods.

The loss (SSE, MSE per dimension, L1, BCE) is what the decoder achieved under q, in the data's
units. Training with w·SSE + KL is the ELBO of σ² = 1/(2w): a sum-reduced MSE (w = 1) implied
σ = 1/√2, a mean-reduced one (w = 1/D) σ = √(D/2), beside the σ in the file and the σ
``vaeeval calibrate`` would fit, √(E[SSE]/D) over the points. ``points`` holds each term that
varies by point and the losses, one number per point in the order of the document's points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vaeeval.format.terms import DENSITY
from vaeeval.results.columns import finite
from vaeeval.results.numbers import Scoring, mean_and_stderr

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_LOG_2 = math.log(2.0)
LOCATION_SCALE = ("gaussian", "laplace")
CONTINUOUS = (*LOCATION_SCALE, "continuous_bernoulli")
SECOND_PASS = "--explain computes it with a second pass over the same draws"
_LOSS = {"gaussian": "SSE", "laplace": "L1", "continuous_bernoulli": "BCE"}
_PER_DIM = {"gaussian": ("mse_per_dim", "MSE per dimension"), "laplace": ("mae_per_dim", "mean |x - mu| per dimension")}


@dataclass(frozen=True)
class LossStatistics:
    """What ``--explain``'s second pass found (``estimators.importance.explain``).

    Attributes:
        values: per point, in the order of the evaluation's points, the mean over its K draws of each
            statistic of ``Likelihood.loss_statistics`` (``loss``, ``weighted_loss``, ``log_scale``,
            ``log_normalizer``, ``log_density_width``), ``[N]`` float64.
        bin_width: the bins' width w, where a statistic is a density times it.
        unavailable: why there are none (a model the pass cannot draw for), instead of ``values``.
    """

    values: Mapping[str, np.ndarray] = field(default_factory=dict)
    bin_width: float | None = None
    unavailable: str | None = None


def binned(family: str, scoring: Scoring) -> bool:
    """A family whose recon is the log of each dimension's bin mass: a continuous one scored on bins, the discretized logistic."""
    return family == "discretized_logistic" or (family in CONTINUOUS and scoring.measure != DENSITY)


def _family(model: Mapping[str, Any]) -> str:
    """The model's likelihood family; a ``decode()`` Normal or Laplace counts as the Gaussian or Laplace family
    with the decoder's own scale (``decode_family`` in its likelihood record, as ``--arch`` writes it)."""
    return model["likelihood"].get("decode_family") or model["family"] if model["family"] == "decode()" else model["family"]


def needs_statistics(model: Mapping[str, Any], scoring: Scoring) -> bool:
    """Whether ``recon_terms`` needs the second pass to write this model's recon out in full."""
    family, scale = _family(model), model.get("scale")
    if binned(family, scoring) or family == "continuous_bernoulli":
        return True
    return family in LOCATION_SCALE and (scale is None or scale["shared"] is None)


def _stat(values: np.ndarray) -> dict[str, float | None]:
    stat = mean_and_stderr(values)
    return {"mean": finite(stat.mean), "stderr": finite(stat.stderr)}


class _Split:
    """A ``recon_terms`` record being built: terms (per point or constant), named statistics, per-point lists."""

    def __init__(self, family: str, form: str) -> None:
        self.record: dict[str, Any] = {"family": family, "form": form, "terms": [], "points": {}}

    def term(self, name: str, values: np.ndarray | float) -> np.ndarray | float:
        if isinstance(values, float):
            self.record["terms"].append({"name": name, "mean": values, "stderr": 0.0})
        else:
            self.record["terms"].append({"name": name, **_stat(values)})
            self.record["points"][name] = [finite(float(v)) for v in values]
        return values

    def named(self, key: str, name: str, values: np.ndarray | None) -> None:
        """A loss under ``key`` (null when unknown), with its per-point list."""
        self.record[key] = None if values is None else {"name": name, **_stat(values)}
        if values is not None:
            self.record["points"][name] = [finite(float(v)) for v in values]

    def per_dimension(self, family: str, loss: np.ndarray | None, dims: int) -> None:
        if family in _PER_DIM:
            self.record[_PER_DIM[family][0]] = None if loss is None else _stat(loss / dims)


def recon_terms(
    recon: np.ndarray, model: Mapping[str, Any], scoring: Scoring, statistics: LossStatistics | None = None
) -> dict[str, Any]:
    """The ``summary.recon_terms`` record of an elbo document.

    Args:
        recon: ``[N]`` per-point reconstruction terms.
        model: ``records.model_record`` of the model (its family, dims, and ``scale``).
        scoring: how the numbers were made (a density, or bin probabilities on how many levels).
        statistics: the second pass's (``--explain``), per point in the order of ``recon``; without
            them a split that needs them is ``terms: null`` with ``why`` saying so.
    """
    family, dims, scale = _family(model), model["dims"], model.get("scale")
    recon = np.asarray(recon, dtype=np.float64)
    if family == "bernoulli":
        return _discrete(recon, family, "BCE", "the binary cross-entropy with the logits")
    if family == "categorical":
        return _discrete(recon, family, "CE", "the cross-entropy of the levels")
    is_binned = binned(family, scoring)
    if family in LOCATION_SCALE and not is_binned and scale is not None:
        loss = statistics.values.get("loss") if statistics is not None else None
        return _fixed_scale(recon, family, dims, scale, loss, statistics.unavailable if statistics is not None else None)
    if not needs_statistics(model, scoring):
        why = ("decode() returns the model's own torch distribution: its log_prob is not written out"
               if family == "decode()" else f"the {family} family is not written as a loss plus constants")
        return {"family": family, "terms": None, "why": why}
    if statistics is None or statistics.unavailable:
        why = statistics.unavailable if statistics is not None else f"{_needed(family, is_binned)}; {SECOND_PASS}"
        return {"family": family, "terms": None, "why": why}
    values = {name: np.asarray(value, dtype=np.float64) for name, value in statistics.values.items()}
    if is_binned:
        levels = scoring.levels or model["likelihood"].get("levels")  # a discretized logistic's are its own
        return _binned(recon, family, dims, levels, statistics.bin_width, values)
    if family == "continuous_bernoulli":
        return _continuous_bernoulli(recon, values)
    return _learned_scale(recon, family, dims, values)


def _needed(family: str, is_binned: bool) -> str:
    if is_binned:
        return ("scored as bin probabilities: each dimension is the log of its bin's mass; the density x bin width "
                "beside it needs the density at the data")
    return {
        "gaussian": "the decoder outputs its own sigma per dimension and point: log sigma_d(z) is inside the expectation",
        "laplace": "the decoder outputs its own scale per dimension and point: log b_d(z) is inside the expectation",
        "continuous_bernoulli": "-BCE plus the log-normalizers sum_d log C(lambda_d(z)), which vary with z",
    }[family]


def _discrete(recon: np.ndarray, family: str, loss: str, what: str) -> dict[str, Any]:
    split = _Split(family, f"recon = -{loss}, {what} summed over dimensions")
    split.term(f"-{loss}", recon)
    split.named("loss", loss, -recon)
    return split.record


def _fixed_scale(
    recon: np.ndarray, family: str, dims: int, scale: Mapping[str, Any], loss: np.ndarray | None, unavailable: str | None
) -> dict[str, Any]:
    """A fixed scale: its terms are exact constants, the loss term recon minus them. With one scale per
    dimension the loss in the data's units is the second pass's (``loss``), else null (``note`` says why)."""
    shared, log_sum = scale.get("shared"), scale["log_sum"]
    gaussian = family == "gaussian"
    if gaussian:
        split = _Split(family, "recon = -E[SSE]/(2 sigma^2) - sum_d log sigma_d - (D/2) log(2 pi)")
        normalizer, constant = -log_sum, -dims * _HALF_LOG_2PI
        weighted = -2 * (recon - normalizer - constant)  # E_q SSE / sigma^2 per point
        split.term("-E[SSE]/(2 sigma^2)", -weighted / 2)
        split.term("-sum_d log sigma_d", normalizer)
        split.term("-(D/2) log(2 pi)", constant)
    else:
        split = _Split(family, "recon = -E[L1]/b - sum_d log(2 b_d)")
        normalizer = -(log_sum + dims * _LOG_2)
        weighted = -(recon - normalizer)  # E_q L1 / b per point
        split.term("-E[L1]/b", -weighted)
        split.term("-sum_d log(2 b_d)", normalizer)
    if shared is not None:
        loss = weighted * shared ** (2 if gaussian else 1)
    split.named("loss", _LOSS[family], loss)
    split.per_dimension(family, loss, dims)
    if gaussian:
        split.record["implied_sigma"] = {
            "in_file": shared,
            "fitted_by_calibrate": None if loss is None else math.sqrt(max(float(np.mean(loss)), 0.0) / dims),
            "sum_reduced_mse": math.sqrt(0.5),
            "mean_reduced_mse": math.sqrt(dims / 2),
        }
    if shared is None:
        weighted_name = "SSE/sigma^2" if gaussian else "L1/b"
        units = "" if loss is not None else "; " + (
            unavailable or "--explain computes the loss in the data's units with a second pass over the same draws")
        split.record["note"] = f"one scale per dimension: the loss the terms hold is the scale-weighted {weighted_name}{units}"
        split.named("weighted_loss", weighted_name, weighted)
    return split.record


def _learned_scale(recon: np.ndarray, family: str, dims: int, values: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A scale the decoder outputs: E[sum_d log s_d(z)] from the second pass, the weighted loss recon minus the rest."""
    if family == "gaussian":
        split = _Split(family, "recon = -E[sum_d (x_d - mu_d)^2 / (2 sigma_d(z)^2)] - E[sum_d log sigma_d(z)] - (D/2) log(2 pi)")
        normalizer, constant = -values["log_scale"], -dims * _HALF_LOG_2PI
        first = split.term("-E[sum_d (x_d - mu_d)^2 / (2 sigma_d^2)]", recon - normalizer - constant)
        split.term("-E[sum_d log sigma_d(z)]", normalizer)
        split.term("-(D/2) log(2 pi)", constant)
        weighted, weighted_name = -2 * first, "sum_d (x_d - mu_d)^2 / sigma_d^2"
    else:
        split = _Split(family, "recon = -E[sum_d |x_d - mu_d| / b_d(z)] - E[sum_d log(2 b_d(z))]")
        normalizer = -(values["log_scale"] + dims * _LOG_2)
        first = split.term("-E[sum_d |x_d - mu_d| / b_d]", recon - normalizer)
        split.term("-E[sum_d log(2 b_d(z))]", normalizer)
        weighted, weighted_name = -first, "sum_d |x_d - mu_d| / b_d"
    split.named("loss", _LOSS[family], values["loss"])
    split.per_dimension(family, values["loss"], dims)
    split.named("weighted_loss", weighted_name, weighted)
    return split.record


def _continuous_bernoulli(recon: np.ndarray, values: Mapping[str, np.ndarray]) -> dict[str, Any]:
    form = "recon = -E[BCE(x, lambda)] + E[sum_d log C(lambda_d)], BCE with the logits summed over dimensions"
    split = _Split("continuous_bernoulli", form)
    log_normalizer = values["log_normalizer"]
    first = split.term("-E[BCE]", recon - log_normalizer)
    split.term("E[sum_d log C(lambda_d)]", log_normalizer)
    split.named("loss", "BCE", -first)
    return split.record


def _binned(
    recon: np.ndarray, family: str, dims: int, levels: int | None, width: float | None, values: Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """recon (the exact log bin masses) as the density x bin width approximation plus how far off it is."""
    split = _Split(family, "recon = E[sum_d log P(bin of x_d)] = E[sum_d log(p(x_d|z) w)] + the difference, w = 1/(L - 1)")
    approximation = split.term("E[sum_d log(p(x_d|z) w)]", values["log_density_width"])
    split.term("difference: recon - E[sum_d log(p(x_d|z) w)]", recon - approximation)
    split.record["bin_width"] = width
    split.record["levels"] = levels
    split.record["note"] = ("the outermost bins reach to the support's ends (to infinity for a Gaussian, Laplace or logistic, "
                            "half a bin for the continuous Bernoulli): there density x w is far from the bin's mass")
    if family in _LOSS:
        split.named("loss", _LOSS[family], values["loss"])
        split.per_dimension(family, values["loss"], dims)
    return split.record
