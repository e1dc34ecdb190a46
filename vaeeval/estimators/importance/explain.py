"""``vaeeval elbo --explain``'s second pass: the likelihood's loss statistics on the evaluation's own draws.

Writing recon = E_q[log p(x|z)] out as a loss plus the terms that make it a log-likelihood
(``results/recon_terms.py``) needs, for some families, per-sample numbers that recon does not
hold: the decoder's own E_q[Σ_d log σ_d(z)], the continuous Bernoulli's E_q[Σ_d log C(λ_d(z))],
the density at the data beside each bin's mass. Rather than widen the evaluation loop and its
results files for an explanation, this pass draws the same K samples again, keyed by
(seed, point, k) through ``evaluate``'s own ``posterior_moments``, ``keyed_draws`` and
``decode_samples``, asks the likelihood for its statistics per sample
(``Likelihood.loss_statistics``) and averages them over the K samples of each point:

    statistic_i = (1/K) Σ_k s(x_i, z_ik)        s summed over the data dimensions in float64

The sums over samples run over fixed blocks of ``BLOCK`` samples (``weights.fold_sum``), so,
like recon, the numbers do not depend on the batch or chunk size. It costs one more pass
through the decoder (README, ``--explain``: measured on the sample models) and runs only when
``recon_terms`` needs it. A model evaluated through its own distributions (the ``--arch``
general path) is redrawn the way ``_evaluate_general_batch`` draws it (``keyed_sample``, its
rows padded as ``ArchModel.log_likelihood`` pads them); a ``decode()`` that returns a Normal or
a Laplace is explained as the Gaussian or Laplace family with the decoder's own scale
(``location_scale_of``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.distributions import Distribution

from vaeeval.estimators.importance.evaluate import Evaluator, decode_samples, keyed_draws, posterior_moments
from vaeeval.estimators.weights import fold_sum
from vaeeval.format.domains import Grid
from vaeeval.format.model import Model
from vaeeval.results.numbers import Evaluation
from vaeeval.results.recon_terms import LossStatistics, needs_statistics
from vaeeval.user.distributions import flows, in_float64, keyed_sample
from vaeeval.user.protocol import ArchModel, location_scale_likelihood


def explain(
    evaluator: Evaluator, evaluation: Evaluation, model: Mapping[str, Any], progress: Callable[[int], None] | None = None
) -> LossStatistics | None:
    """The statistics ``recon_terms`` needs for ``evaluation``'s points, or None where it needs none.

    Args:
        evaluator: what made ``evaluation`` (its model, data, seed, K, batch and chunk sizes).
        evaluation: the points to explain (``points.index``, in that order).
        model: ``records.model_record`` of the model, as the document holds it.
        progress: called with the number of points done after each batch.
    """
    if not needs_statistics(model, evaluation.scoring):
        return None
    return loss_statistics(evaluator, evaluation.points.index, progress)


def loss_statistics(
    evaluator: Evaluator, indices: np.ndarray, progress: Callable[[int], None] | None = None
) -> LossStatistics:
    """Per point ``indices`` (in that order), the mean over its K keyed draws of each of the likelihood's statistics."""
    model, settings = evaluator.model, evaluator.settings
    bins = evaluator.scoring.bins
    likelihood = model.likelihood
    found: dict[str, list[np.ndarray]] = {}
    indices = np.asarray(indices, dtype=np.int64)
    with torch.inference_mode():
        for start in range(0, indices.size, settings.batch_size):
            rows = indices[start : start + settings.batch_size]
            x, covariates = evaluator.batch(rows)
            draw = _general_draws(model, x, covariates, bins) if model.general else _format_1_draws(model, x, covariates, bins)
            totals: dict[str, torch.Tensor] = {}
            for first in range(0, settings.samples, settings.chunk_size):
                drawn = draw(settings.seed, rows, first, min(settings.samples, first + settings.chunk_size))
                for name, values in drawn.items():
                    totals[name] = fold_sum(totals.get(name, values.new_zeros(rows.size)), values)
            for name, total in totals.items():
                found.setdefault(name, []).append((total / settings.samples).cpu().numpy())
            if progress is not None:
                progress(start + rows.size)
    own = Grid(likelihood.levels) if not likelihood.continuous and likelihood.levels else bins  # a discrete family's bins are its own
    return LossStatistics(
        values={name: np.concatenate(parts) for name, parts in found.items()},
        bin_width=None if own is None else own.step,
    )


Draw = Callable[[int, np.ndarray, int, int], dict[str, torch.Tensor]]


def _format_1_draws(model: Model, x: torch.Tensor, covariates: Mapping[str, torch.Tensor], bins: Grid | None) -> Draw:
    """Statistics ``[B, S]`` of samples first .. last - 1, drawn as ``_evaluate_batch`` draws them."""
    mean, std = posterior_moments(model, x, covariates)

    def draw(seed: int, rows: np.ndarray, first: int, last: int) -> dict[str, torch.Tensor]:
        z = keyed_draws(mean, std, seed, rows, first, last)
        return model.likelihood.loss_statistics(decode_samples(model, z, covariates), x[:, None], bins)

    return draw


def _general_draws(model: ArchModel, x: torch.Tensor, covariates: Mapping[str, torch.Tensor], bins: Grid | None) -> Draw:
    """Statistics ``[B, S]`` of samples first .. last - 1, drawn and decoded as ``_evaluate_general_batch`` does."""
    q = in_float64(model.posterior(x, dict(covariates)))

    def draw(seed: int, rows: np.ndarray, first: int, last: int) -> dict[str, torch.Tensor]:
        count = last - first
        z = keyed_sample(q, seed, rows, first, last)  # [S, B, L]
        if not flows(q):
            z = z.to(torch.float32).double() if z.dtype == torch.float64 else z
        points_first = z.transpose(0, 1).reshape(rows.size * count, model.latent_dim).to(torch.float32)
        repeated = {name: value.repeat_interleave(count, dim=0) for name, value in covariates.items()}
        data = x.repeat_interleave(count, dim=0)
        output, data, n, _ = model.decode_rows(points_first, data, repeated)
        likelihood, params = model.likelihood, output
        if isinstance(output, Distribution):
            likelihood, params = location_scale_likelihood(output, model.input_shape)
        drawn = likelihood.loss_statistics(params, data, bins)
        return {name: values[:n].reshape(rows.size, count) for name, values in drawn.items()}

    return draw
