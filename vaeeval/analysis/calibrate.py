"""Fit the free scale of a decoder's likelihood on held-out data: the σ of a Gaussian, the b of a Laplace.

A decoder trained with a squared error (or an absolute one) has no scale of its own, yet
log p(x|z) depends on it by tens to hundreds of nats. ``calibrate`` picks the scale that
maximizes the ELBO on data the user holds out, the choice the training loss implies
(w·SSE + KL is the ELBO of σ² = 1/(2w)). The KL does not depend on the scale and the
decoder's means μ(z) do not either, so the optimum has a closed form in the expected
residuals under q(z|x), estimated with K draws z_k per point, keyed by (seed, point, k)
exactly as ``evaluate`` draws them:

    Gaussian, shared:        σ²  = (1/(N D)) Σ_i (1/K) Σ_k ‖x_i − μ(z_ik)‖²
    Gaussian, per dimension: σ_d² = (1/N)   Σ_i (1/K) Σ_k (x_id − μ_d(z_ik))²
    Laplace:                 b (or b_d) the same with |x − μ| in place of the square.

On discrete data scored as bin probabilities, and for ``criterion="iwae"``, there is no
closed form: the scale is found by a 1-D search on log σ (a grid of 21 points over
e^-6 .. e^4 times the closed-form density σ, then golden-section search around the best to
1e-6 relative), every evaluation on the same draws (one shared scale only).

With the same seed and K, the calibrated model's reconstruction term on that data is then
exactly −(D/2)(1 + log 2πσ²) per point on average (Gaussian, shared). Sums run in float64
over fixed blocks of samples and then over points with ``math.fsum``: the fit does not
depend on the batch size. The fitted file differs from the original only in the
likelihood's scale and a ``calibration`` record (docs/FORMAT.md): every tensor is kept.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from vaeeval.core.numerics import tree_sum
from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.importance.evaluate import decode_samples, evaluate, keyed_draws, posterior_moments
from vaeeval.format.data import Dataset
from vaeeval.format.likelihoods import Likelihood, likelihood_from_spec
from vaeeval.format.model import METADATA_KEY, Model
from vaeeval.format.reading import load_model, read_safetensors
from vaeeval.io.files import staged, writing
from vaeeval.results.numbers import exact_sum

FAMILIES = {"gaussian": ("sigma", "log_sigma", "σ"), "laplace": ("scale", "log_scale", "b")}
CRITERIA = ("elbo", "iwae")
GOLDEN = (math.sqrt(5) - 1) / 2
BLOCK = 64  # samples per block of the fit's sums: a fixed order, whatever the batch size


@dataclass(frozen=True)
class Calibration:
    """A fitted scale and what it changed on the calibration data.

    Attributes:
        family: ``gaussian`` or ``laplace``.
        scale: the fitted σ (or b), one number, or ``[*input_shape]`` per dimension.
        before, after: the calibration data's mean ELBO and IWAE (nats per point) with the file's scale and the fitted one.
        record: the ``calibration`` record the fitted file holds.
        arch_options: for an ``--arch`` model, what to pass with the written weights to use the fitted scale.
    """

    family: str
    scale: float | np.ndarray
    before: dict[str, float]
    after: dict[str, float]
    record: dict[str, Any]
    arch_options: tuple[str, ...] | None = None

    @property
    def per_dimension(self) -> bool:
        return isinstance(self.scale, np.ndarray)


def expected_residuals(model: Model, data: Dataset, *, samples: int, seed: int, batch_size: int = 64,
                       power: int = 2) -> np.ndarray:
    """E_q |x_d − μ_d(z)|^power per point and dimension, ``[N, D]`` float64, from K keyed draws per point."""
    rows: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, data.n, batch_size):
            indices = np.arange(start, min(data.n, start + batch_size))
            x = torch.as_tensor(np.asarray(data.array[indices]), dtype=torch.float32)
            covariates = {name: torch.as_tensor(np.asarray(values[indices])) for name, values in data.covariates.items()}
            mean, std = posterior_moments(model, x, covariates)
            flat = x.reshape(len(indices), 1, -1).double()
            total = torch.zeros(len(indices), flat.shape[-1], dtype=torch.float64)
            for first in range(0, samples, BLOCK):
                z = keyed_draws(mean, std, seed, indices, first, min(samples, first + BLOCK))  # as evaluate draws them
                means = decode_samples(model, z, covariates)[:, :, 0].reshape(len(indices), z.shape[1], -1).double()
                residual = (flat - means).abs()
                total += tree_sum((residual * residual if power == 2 else residual).movedim(1, -1))
            rows.append((total / samples).numpy())
    return np.concatenate(rows)


def fit_scale(residuals: np.ndarray, per_dimension: bool, power: int) -> float | np.ndarray:
    """The ELBO-optimal scale from ``expected_residuals``: a root mean square (Gaussian) or a mean (Laplace)."""
    columns = [exact_sum(residuals[:, d]) / residuals.shape[0] for d in range(residuals.shape[1])]
    if per_dimension:
        values = np.array(columns)
        return np.sqrt(values) if power == 2 else values
    value = math.fsum(columns) / len(columns)
    return math.sqrt(value) if power == 2 else value


def calibrate(
    model: Model,
    data: Dataset,
    output: str | Path,
    *,
    per_dimension: bool = False,
    samples: int = 100,
    seed: int = 0,
    batch_size: int = 64,
    density: bool = False,
    criterion: str = "elbo",
    progress: Callable[[int], None] | None = None,
) -> Calibration:
    """Fit the likelihood's scale on ``data`` by the ELBO and write the model with it to ``output``.

    Args:
        model: a format-1 model with a Gaussian or Laplace likelihood whose scale is not a decoder output.
        data: the held-out points to fit on.
        output: the new model file (never one of the inputs: the caller checks).
        per_dimension: one scale per input dimension (``log_sigma`` of the input shape), not one shared.
        samples, seed: K draws per point, keyed as ``evaluate`` keys them.
        batch_size: points per encoder pass (the fit does not depend on it).
        density: score discrete data as a density (fit the density's scale) instead of by its bins.
        criterion: ``elbo`` (the default; a closed form on densities) or ``iwae``.
        progress: called with the number of points fitted.

    An ``--arch`` model (read with ``--likelihood gaussian`` or ``laplace``) gets its weights file
    written again with the fitted log-scale as one more tensor (``write_weights``), not a format-1 file.

    Raises:
        VaeevalError: a model evaluated through its own distributions, a family without a free scale, a
            decoder that outputs its own scale, or one scale per dimension asked where only a 1-D
            search can find it (bins, or the IWAE).
    """
    family = model.likelihood.family
    if model.posterior_family != "gaussian" or model.hierarchy is not None:
        kind = "has two latent groups" if model.hierarchy is not None else f"is {model.posterior_family} (a discrete latent)"
        raise VaeevalError(f"calibrate fits a scale on the draws of one Gaussian q(z|x); this model's latent {kind}")
    if getattr(model, "discrete_latent", None):
        raise VaeevalError(
            f"calibrate fits a scale on the draws of a Gaussian q(z|x); this model's latent is discrete "
            f"({model.discrete_latent}): give the scale with {option('sigma')}"
        )
    if model.path is None or model.general:
        raise VaeevalError(
            "this model is evaluated through the distributions its own code returns (from decode or prior, or with "
            f"covariates): calibrate fits the scale of a decoder read with {option('likelihood')} gaussian or laplace"
        )
    if family not in FAMILIES:
        raise VaeevalError(
            f"the {family} likelihood has no free scale to fit (calibrate fits a Gaussian's sigma or a Laplace's scale)"
        )
    if model.likelihood.params_per_dim != 1:
        raise VaeevalError(f"the decoder outputs its own {FAMILIES[family][2]} (P = 2): there is no free scale to fit")
    if criterion not in CRITERIA:
        raise VaeevalError(f"{option('criterion')} {criterion!r}: choose one of {', '.join(CRITERIA)}")
    binned = data.domain.kind in ("binary", "discrete") and not density
    searched = binned or criterion != "elbo"
    if searched and per_dimension:
        why = f"the data is {data.domain.describe()}, scored as bin probabilities" if binned else "the IWAE is the criterion"
        density_fix = f", or give {option('density')} to fit the density's" if binned else ""
        raise VaeevalError(
            f"{why}: the best scale has no closed form and is searched in one dimension, so one shared scale only "
            f"(drop {option('per_dimension')}{density_fix})"
        )
    power = 2 if family == "gaussian" else 1
    key = FAMILIES[family][0]
    before = evaluate(model, data, samples=samples, seed=seed, batch_size=batch_size, density=density)
    residuals = expected_residuals(model, data, samples=samples, seed=seed, batch_size=batch_size, power=power)
    if progress is not None:
        progress(data.n)
    scale = fit_scale(residuals, per_dimension, power)
    if searched and float(scale) > 0:
        def objective(log_scale: float) -> float:
            trial = replace(model, likelihood=with_scale(model, key, math.exp(log_scale)))
            found = evaluate(trial, data, samples=samples, seed=seed, batch_size=batch_size, density=density)
            value = getattr(found.summary, criterion).mean
            return value if math.isfinite(value) else -math.inf

        scale = math.exp(maximize(objective, math.log(float(scale))))
    smallest = float(np.min(scale))
    if not smallest > 0 or not math.isfinite(float(np.max(scale))):
        raise VaeevalError(f"the fitted {FAMILIES[family][2]} is {smallest:g}: the decoder reproduces the data exactly")
    record = {
        "criterion": criterion,
        "scored": "bins" if binned else "density",
        "data": {"path": str(data.path) if data.path else None, "digest": data.digest, "n": data.n,
                 "domain": data.domain.to_spec()},
        "samples": samples,
        "seed": seed,
        "per_dimension": per_dimension,
        "before": {"elbo": before.summary.elbo.mean, "iwae": before.summary.iwae.mean},
    }
    if model.arch:
        fitted = write_weights(model, Path(output), scale)
    else:
        fitted = write_scale(model.path, Path(output), family, scale, record)
    after = evaluate(fitted, data, samples=samples, seed=seed, batch_size=batch_size, density=density)
    return Calibration(
        family, scale, record["before"], {"elbo": after.summary.elbo.mean, "iwae": after.summary.iwae.mean}, record,
        ("--log-sigma-tensor", ARCH_TENSOR) if model.arch else None,
    )


def write_scale(source: Path, output: Path, family: str, scale: float | np.ndarray, record: dict[str, Any]) -> Model:
    """``source``'s model with the likelihood's scale set to ``scale`` and the ``calibration`` record, at ``output``."""
    header, tensors = read_safetensors(source)
    document = json.loads(header["__metadata__"][METADATA_KEY])
    key, log_key, _ = FAMILIES[family]
    likelihood = without_scale(document["likelihood"])
    old_tensor = document["likelihood"].get(log_key)
    if isinstance(old_tensor, str):
        tensors.pop(old_tensor, None)  # the scale it held is replaced
    if isinstance(scale, np.ndarray):
        name = f"likelihood.{log_key}"
        tensors[name] = torch.as_tensor(np.log(scale), dtype=torch.float32).reshape(document["input_shape"])
        likelihood[log_key] = name
        fitted: Any = name
    else:
        likelihood[key] = scale
        fitted = scale
    document["likelihood"] = likelihood
    document["calibration"] = {**record, "fitted": fitted}
    with writing(output, "model"), staged(output) as temporary:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(temporary), metadata={METADATA_KEY: json.dumps(document)})
        load_model(temporary)  # refuse, leaving no file, what would not load
    return load_model(output)


def with_scale(model: Model, key: str, scale: float) -> Likelihood:
    """The model's likelihood with one shared scale ``scale`` in place of its own."""
    return likelihood_from_spec({**without_scale(model.likelihood.spec), key: scale}, {}, model.input_shape)


def maximize(objective: Callable[[float], float], center: float, *, tolerance: float = 1e-6) -> float:
    """The argmax of ``objective`` on the log scale: a grid of 21 points over center - 6 .. center + 4,
    then golden-section search between the best point's neighbours until they are ``tolerance`` apart."""
    grid = [center - 6 + 0.5 * step for step in range(21)]
    values = [objective(point) for point in grid]
    best = max(range(len(grid)), key=values.__getitem__)
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    a, b = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
    fa, fb = objective(a), objective(b)
    while high - low > tolerance:
        if fa >= fb:
            high, b, fb = b, a, fa
            a = high - GOLDEN * (high - low)
            fa = objective(a)
        else:
            low, a, fa = a, b, fb
            b = low + GOLDEN * (high - low)
            fb = objective(b)
    return (low + high) / 2


ARCH_TENSOR = "calibrated_log_scale"  # the tensor an --arch model's calibrated weights file adds


def write_weights(model: Model, output: Path, scale: float | np.ndarray) -> Model:
    """For an ``--arch`` model: its weights file again with the fitted log-scale as one more tensor
    (``ARCH_TENSOR``, shape ``[]`` or the input shape: ``--log-sigma-tensor calibrated_log_scale``), and
    the model with that scale. A shared scale can as well be passed as ``--sigma`` with the original weights."""
    header, tensors = read_safetensors(model.path)
    if ARCH_TENSOR in tensors:
        raise VaeevalError(f"{model.path} already holds a tensor {ARCH_TENSOR!r}: calibrate the original weights")
    shape = model.input_shape if isinstance(scale, np.ndarray) else ()
    tensors[ARCH_TENSOR] = torch.as_tensor(np.log(scale), dtype=torch.float32).reshape(shape)
    metadata = header.get("__metadata__") or None
    with writing(output, "weights"), staged(output) as temporary:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(temporary), metadata=metadata)
    spec = {**without_scale(model.likelihood.spec), FAMILIES[model.likelihood.family][1]: ARCH_TENSOR}
    likelihood = likelihood_from_spec(spec, {ARCH_TENSOR: tensors[ARCH_TENSOR]}, model.input_shape)
    return replace(model, likelihood=likelihood)


def without_scale(spec: dict[str, Any]) -> dict[str, Any]:
    """A Gaussian's or Laplace's ``likelihood`` block without its scale (the number or the log-scale tensor)."""
    return {name: value for name, value in spec.items() if name not in FAMILIES[spec["family"]][:2]}
