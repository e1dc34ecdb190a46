"""The batched, chunked evaluation loop: model + data -> per-point arrays -> summary.

Points are taken ``batch_size`` at a time (one encoder pass per batch), and
their K samples ``chunk_size`` at a time, so memory is bounded by
batch x chunk whatever K is. Noise for sample k of point i comes from
``rng.standard_normal`` keyed by (seed, i, k), and reductions over samples run
in fixed blocks, so results do not depend on the batch or chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch.distributions import Independent, Normal

from vaeeval.core.rng import standard_normal
from vaeeval.errors import VaeevalError, option
from vaeeval.estimators.importance.budget import batch_within, chunk_size_for
from vaeeval.estimators.importance.enumeration import DEFAULT_MAX_SUPPORT, enumerate_batch, enumerated, plan, sampled
from vaeeval.estimators.importance.scoring import choose_scoring
from vaeeval.estimators.weights import BLOCK, LogSumExp, Moments, iwae_bound, iwae_stderr, log_weights
from vaeeval.format.data import Dataset
from vaeeval.format.domains import Grid, detect_domain
from vaeeval.format.model import Model, rows_independently
from vaeeval.results.numbers import METRICS, Convergence, Evaluation, Part, PointResults, Settings, convergence_checkpoints, evaluation_of
from vaeeval.results.psis import pareto_khat, reliability_threshold, top_size
from vaeeval.user.distributions import flows, in_float64, keyed_sample, moments
from vaeeval.user.protocol import ArchModel

DEFAULT_SAMPLES = 1000
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_MEMORY = 512 * 2**20
MAX_SAMPLES = 10**8  # per point: more would take days on any machine, and the per-point tail for k-hat grows as sqrt(K)
MAX_BATCH_SIZE = 10**6


@dataclass(frozen=True)
class EvaluationOptions:
    """How to evaluate: the settings ``Evaluator`` and ``compare`` take (``evaluate`` takes them one by one).

    Attributes:
        samples: K, importance samples per point.
        seed: 0 <= seed < 2**64; with it the point indices key the noise.
        batch_size: points per encoder pass.
        max_memory: bytes the decoder working set may use; sets the chunk size.
        chunk_size: samples per chunk (a multiple of ``estimators.BLOCK``), instead of ``max_memory``.
        device: where to compute: ``cpu``, ``cuda`` or ``cuda:N``.
        discretize: score a continuous likelihood as bin probabilities on this many levels.
        density: keep a continuous likelihood's density even when the data is discrete.
        grid_range: the values [low, high] the ``discretize`` grid spans (default: the data's grid's).
        enumerate_latent: sum over every value of a finite discrete z (``enumeration``): True, False, or
            None for whenever it takes at most ``max_support`` values.
    """

    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    max_memory: int = DEFAULT_MAX_MEMORY
    chunk_size: int | None = None
    device: str = "cpu"
    discretize: int | None = None
    density: bool = False
    grid_range: tuple[float, float] | None = None
    enumerate_latent: bool | None = None
    max_support: int = DEFAULT_MAX_SUPPORT


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked to exist here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VaeevalError(f"{option('device')} {name!r} is not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaeevalError(f"{option('device')} {name}: no CUDA device is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise VaeevalError(f"{option('device')} {name}: vaeeval runs on cpu or cuda")
    return device


STATISTICS_SAMPLES = 256  # samples per point drawn and folded into the statistics at a time (whole chunks)


class Evaluator:
    """An evaluation made ready: settings checked, scoring chosen, the model on its device.

    ``parts`` evaluates any subset of the points, batch by batch; ``finish`` turns the
    parts into one ``Evaluation``. Every point's numbers depend only on the seed and its
    index, so parts computed in any order, by any process, combine into the numbers of
    one uninterrupted run.

    Args:
        model: a loaded model.
        data: ``[N, *input_shape]`` points, already checked (``load_data``).
        options: how to evaluate.

    Raises:
        VaeevalError: bad settings, naming the option.
    """

    def __init__(self, model: Model, data: Dataset | np.ndarray, options: EvaluationOptions | None = None) -> None:
        options = options or EvaluationOptions()
        if (model.posterior_family != "gaussian" or model.hierarchy is not None) and not model.general:
            kind = "two latent groups" if model.hierarchy is not None else f"a {model.posterior_family} latent"
            raise VaeevalError(
                f"the model has {kind} (format 1's optional blocks): read it with vaeeval.load_model, which evaluates it "
                "through its distributions"
            )
        if not isinstance(data, Dataset):
            array = np.asarray(data)
            data = Dataset(array, total=int(array.shape[0]), domain=detect_domain(array))
        self.dataset = data
        self.array = data.array
        if options.samples < 1 or options.batch_size < 1:
            raise VaeevalError(f"{option('samples')} and {option('batch_size')} must be at least 1")
        if options.samples > MAX_SAMPLES or options.batch_size > MAX_BATCH_SIZE:
            raise VaeevalError(
                f"{option('samples')} {options.samples} or {option('batch_size')} {options.batch_size} is too large "
                f"(at most {MAX_SAMPLES:,} samples and {MAX_BATCH_SIZE:,} points per batch)"
            )
        if not 0 <= options.seed < 2**64:
            raise VaeevalError(f"{option('seed')} must be between 0 and 2**64 - 1, found {options.seed}")
        batch_size = batch_within(model, options.batch_size, min(options.samples, BLOCK), options.max_memory)
        chunk_size = options.chunk_size
        if chunk_size is None:
            chunk_size = chunk_size_for(model, batch_size, options.samples, options.max_memory)
        elif chunk_size < 1 or chunk_size % BLOCK:
            raise VaeevalError(f"{option('chunk_size')} must be a positive multiple of {BLOCK}, found {chunk_size}")
        self.domain = data.domain
        self.scoring = choose_scoring(
            model.likelihood, self.domain, model.domain, discretize=options.discretize, density=options.density,
            grid_range=options.grid_range, array=data.array,
        )
        device = resolve_device(str(options.device))
        self.model = model.to(device)
        self.support = plan(model, options.enumerate_latent, options.max_support)  # values of z to sum over, or None
        self.model = sampled(self.model) if self.support is None else enumerated(self.model, self.support)
        self.settings = Settings(options.samples, options.seed, batch_size, chunk_size, str(device))
        self.checkpoints = convergence_checkpoints(options.samples)

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    def parts(self, indices: np.ndarray | None = None, progress: Callable[[int], None] | None = None) -> Iterator[Part]:
        """Evaluate the points ``indices`` (default: all, in order), one batch per part.

        Args:
            indices: rows of the data, in the order to evaluate them.
            progress: called after each batch with the number of points done so far.
        """
        indices = np.arange(self.n) if indices is None else np.asarray(indices, dtype=np.int64)
        settings = self.settings
        with torch.inference_mode():
            for start in range(0, indices.size, settings.batch_size):
                rows = indices[start : start + settings.batch_size]
                x, covariates = self.batch(rows)
                if self.support is not None:
                    exact = enumerate_batch(self.model, x, self.support, self.scoring.bins, covariates)
                    part = exact.part(rows, settings.samples, len(self.checkpoints))
                else:
                    estimate = _evaluate_general_batch if self.model.general else _evaluate_batch
                    estimates = estimate(
                        self.model, x, rows, settings.samples, settings.seed, settings.chunk_size,
                        self.scoring.bins, self.checkpoints, covariates,
                    )
                    part = estimates.part(rows, settings.samples)
                if self.dataset.lengths is not None:  # padded sequences: each point's tokens, for the per-token numbers
                    part = replace(part, points=replace(part.points, tokens=self.dataset.lengths[rows]))
                _check_finite(part.points)
                yield part
                if progress is not None:
                    progress(start + rows.size)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The points ``rows`` as the encoder takes them (float32, on the device), and their covariates."""
        contiguous = bool(np.all(np.diff(rows) == 1))  # a slice reads a memory map without a copy
        batch = self.array[rows[0] : rows[-1] + 1] if contiguous else self.array[rows]
        device = self.settings.device
        return torch.from_numpy(np.array(batch, dtype=np.float32)).to(device), self.dataset.covariates_of(rows, device)

    def evaluate(self, progress: Callable[[int], None] | None = None) -> Evaluation:
        """Every point, in one go."""
        return self.finish(list(self.parts(progress=progress)))

    def finish(self, parts: Sequence[Part]) -> Evaluation:
        """One evaluation from parts covering each point once, in index order."""
        gathered = PointResults.concatenate([p.points for p in parts])
        order = np.argsort(gathered.index, kind="stable")
        return evaluation_of(
            gathered.take(order),
            settings=self.settings,
            scoring=self.scoring,
            kl_kind=self.model.prior.kl_kind,
            domain=self.domain,
            dims=self.model.data_dims,
            convergence=Convergence(self.checkpoints, np.concatenate([p.convergence for p in parts])[order]),
            latent_means=np.concatenate([p.latent_means for p in parts])[order],
            latent_vars=np.concatenate([p.latent_vars for p in parts])[order],
        )


def evaluate(
    model: Model,
    data: Dataset | np.ndarray,
    *,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_memory: int = DEFAULT_MAX_MEMORY,
    chunk_size: int | None = None,
    device: str = "cpu",
    discretize: int | None = None,
    density: bool = False,
    grid_range: tuple[float, float] | None = None,
    enumerate_latent: bool | None = None,
    max_support: int = DEFAULT_MAX_SUPPORT,
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Estimate ELBO, reconstruction, KL and IWAE, with their diagnostics, for every point.

    Args:
        model: a loaded model.
        data: ``[N, *input_shape]`` points, already checked (``load_data``).
        samples, seed, batch_size, max_memory, chunk_size, device, discretize, density, grid_range,
            enumerate_latent, max_support: see ``EvaluationOptions`` (a discrete latent of at most
            ``max_support`` values is summed over exactly unless ``enumerate_latent`` is False).
        progress: called with the number of points finished after each batch.

    Returns:
        Per-point estimates (points numbered by their row in ``data``) and their summary.

    Raises:
        VaeevalError: bad settings, or a point whose estimate is not finite.
    """
    options = EvaluationOptions(
        samples, seed, batch_size, max_memory, chunk_size, device, discretize, density, grid_range, enumerate_latent, max_support
    )
    return Evaluator(model, data, options).evaluate(progress)


@dataclass(frozen=True)
class BatchEstimates:
    """One batch's estimates and diagnostics: float64 tensors, one row per point.

    ``top_log_w`` holds each point's largest log-weights (for k-hat), ``convergence``
    the IWAE over its first k samples at each checkpoint, ``q_mean`` and ``q_var``
    the encoder's q(z|x).
    """

    elbo: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    iwae: torch.Tensor
    kl_stderr: torch.Tensor
    elbo_stderr: torch.Tensor
    iwae_stderr: torch.Tensor
    ess: torch.Tensor
    top_log_w: torch.Tensor
    convergence: torch.Tensor
    q_mean: torch.Tensor
    q_var: torch.Tensor

    def part(self, rows: np.ndarray, samples: int) -> Part:
        """These points' NumPy results, with their k-hat."""
        found = {f.name: getattr(self, f.name).cpu().numpy() for f in fields(self)}
        khat = pareto_khat(found.pop("top_log_w"), samples)
        return Part(
            points=PointResults(
                index=rows.copy(),
                khat=khat,
                unreliable=khat > reliability_threshold(samples),
                **{f.name: found.pop(f.name) for f in fields(PointResults) if f.name in found},
            ),
            convergence=found.pop("convergence"),
            latent_means=found.pop("q_mean"),
            latent_vars=found.pop("q_var"),
        )


class _SampleStatistics:
    """Everything kept per point while its K samples stream past in chunks: O(1) in K but the tail."""

    def __init__(
        self, rows: int, samples: int, checkpoints: tuple[int, ...], like: torch.Tensor, monte_carlo_kl: bool
    ) -> None:
        self.samples, self.checkpoints, self.monte_carlo_kl = samples, checkpoints, monte_carlo_kl
        self.weights = LogSumExp(rows, like)
        self.top = torch.empty((rows, 0), dtype=torch.float64, device=like.device)
        self.recon, self.log_w, self.log_ratio = Moments(), Moments(), Moments()
        self.prefixes: dict[int, torch.Tensor] = {}

    def update(self, first: int, log_px_z: torch.Tensor, log_pz: torch.Tensor, log_qz: torch.Tensor) -> None:
        log_w = log_weights(log_px_z, log_pz, log_qz)
        self.prefixes.update(self.weights.update(log_w, first, self.checkpoints))
        kept = torch.cat([self.top, log_w], dim=1)
        self.top = torch.topk(kept, min(top_size(self.samples), kept.shape[1]), dim=1).values
        self.recon.update(log_px_z)
        if self.monte_carlo_kl:  # the KL and the ELBO's error then come from these samples
            self.log_w.update(log_w)
            self.log_ratio.update(log_qz - log_pz)

    def finish(self, analytic_kl: torch.Tensor | None, q_mean: torch.Tensor, q_var: torch.Tensor) -> BatchEstimates:
        samples = self.samples
        recon = self.recon.mean(samples)
        if analytic_kl is None:  # Monte Carlo KL from the same samples: the ELBO is the mean log-weight
            kl, kl_stderr, elbo_stderr = self.log_ratio.mean(samples), self.log_ratio.stderr(samples), self.log_w.stderr(samples)
        else:
            kl, kl_stderr, elbo_stderr = analytic_kl, torch.zeros_like(analytic_kl), self.recon.stderr(samples)
        ess, log_sum_w = self.weights.effective_sample_size(), self.weights.log_sum()
        return BatchEstimates(
            elbo=recon - kl,
            recon=recon,
            kl=kl,
            iwae=iwae_bound(log_sum_w, samples),
            kl_stderr=kl_stderr,
            elbo_stderr=elbo_stderr,
            iwae_stderr=iwae_stderr(ess, samples),
            ess=ess,
            top_log_w=self.top,
            convergence=torch.stack(
                [iwae_bound(self.prefixes[k] if k < samples else log_sum_w, k) for k in self.checkpoints], dim=1
            ),
            q_mean=q_mean,
            q_var=q_var,
        )


def posterior_moments(
    model: Model, x: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x)'s mean and standard deviation ``[B, L]``, float64, for points ``x`` (format 1's path)."""
    mean, log_var = model.encode(x, covariates)
    return mean.double(), (0.5 * log_var.double()).exp()


def keyed_draws(mean: torch.Tensor, std: torch.Tensor, seed: int, indices: np.ndarray, first: int, last: int) -> torch.Tensor:
    """Samples ``first .. last - 1`` of each point from N(mean, std²), as the decoder takes them: float32
    ``[B, last - first, L]``, each keyed by (seed, point index, sample number)."""
    eps = standard_normal(seed, indices, first, last, mean.shape[-1]).to(mean.device)
    return (mean[:, None] + std[:, None] * eps).to(torch.float32)


def decode_samples(model: Model, z: torch.Tensor, covariates: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The likelihood's parameters ``[B, S, *decode_shape]`` for samples ``z [B, S, L]``, each with its point's covariates."""
    rows, count, latent = z.shape
    repeated = {name: value.repeat_interleave(count, dim=0) for name, value in (covariates or {}).items()}
    return model.decode(z.reshape(-1, latent), repeated).reshape(rows, count, *model.decode_shape)


def _evaluate_batch(
    model: Model,
    x: torch.Tensor,
    indices: np.ndarray,
    samples: int,
    seed: int,
    chunk_size: int,
    bins: Grid | None,
    checkpoints: tuple[int, ...],
    covariates: Mapping[str, torch.Tensor] | None = None,
) -> BatchEstimates:
    """The estimates and diagnostics, ``[B, ...]`` float64, for one batch of points ``x`` (format 1's path).

    ``covariates``: the points' own, for a model conditioned on them (each sample decodes with its point's).
    """
    covariates = dict(covariates or {})
    mean, std = posterior_moments(model, x, covariates)
    analytic_kl = model.prior.kl(Independent(Normal(mean, std, validate_args=False), 1))
    q = Independent(Normal(mean[:, None], std[:, None], validate_args=False), 1)
    prior = model.prior.distribution(mean)

    rows, latent = mean.shape
    statistics = _SampleStatistics(rows, samples, checkpoints, mean, monte_carlo_kl=analytic_kl is None)
    x_each = x[:, None]
    shortcut = _linear_shortcut(model, x, bins)

    def log_likelihood(z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) ``[B, S]`` for the points' samples ``z [B, S, L]`` (float32), one decoder call."""
        count = z.shape[1]
        if shortcut is None:
            return model.likelihood.log_prob(decode_samples(model, z, covariates), x_each, bins)
        trunk, head, projected, offset = shortcut
        hidden, logits = model.decode_through_head(z.reshape(-1, latent), trunk, head)
        return model.likelihood.log_prob_through_linear(
            hidden.reshape(rows, count, -1), logits.reshape(rows, count, -1), projected, offset
        )

    # Draws and statistics take several decoder chunks at a time: fewer small tensor operations, same bits.
    stride = chunk_size * max(1, STATISTICS_SAMPLES // chunk_size)
    for first in range(0, samples, stride):
        last = min(samples, first + stride)
        z = keyed_draws(mean, std, seed, indices, first, last)  # the decoder's input...
        z64 = z.double()  # ...and exactly that point for the densities
        pieces = [log_likelihood(z[:, start : start + chunk_size]) for start in range(0, last - first, chunk_size)]
        log_px_z = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        statistics.update(first, log_px_z, prior.log_prob(z64), q.log_prob(z64))
    return statistics.finish(analytic_kl, mean, std * std)


def _evaluate_general_batch(
    model: ArchModel,
    x: torch.Tensor,
    indices: np.ndarray,
    samples: int,
    seed: int,
    chunk_size: int,
    bins: Grid | None,
    checkpoints: tuple[int, ...],
    covariates: Mapping[str, torch.Tensor] | None = None,
) -> BatchEstimates:
    """``_evaluate_batch`` for a model whose parts are torch distributions (``Model.general``).

    The same estimators, from keyed draws of q(z|x) (``keyed_sample``), log q and log p(z)
    from the distributions in float64, and log p(x|z) from what ``decode`` returns: its
    distribution's ``log_prob`` (binned through its ``cdf`` where asked), or a format-1
    likelihood of its parameters. Draws of a distribution without a normalizing flow are
    rounded to float32 first, as on the fast path; a flow's draws stay as drawn, since
    its ``log_prob`` may need them cached to invert it.
    """
    covariates = dict(covariates or {})
    q = model.posterior(x, covariates)
    analytic_kl = model.prior.kl(q)
    q, prior = in_float64(q), model.prior.distribution(x)
    rows, latent = x.shape[0], model.latent_dim
    statistics = _SampleStatistics(rows, samples, checkpoints, x, monte_carlo_kl=analytic_kl is None)
    found = moments(q)
    drawn = Moments() if found is None else None
    for first in range(0, samples, chunk_size):
        last = min(samples, first + chunk_size)
        count = last - first
        z = keyed_sample(q, seed, indices, first, last)  # [S, B, L]
        if not flows(q):
            z = z.to(torch.float32).double() if z.dtype == torch.float64 else z
        log_qz = model.user_log_prob("encode(x)", q, z)
        log_pz = model.user_log_prob("prior()", prior, z)
        points_first = z.transpose(0, 1).reshape(rows * count, latent)
        repeated = {name: value.repeat_interleave(count, dim=0) for name, value in covariates.items()}
        log_px_z = model.log_likelihood(points_first.to(torch.float32), x.repeat_interleave(count, dim=0), repeated, bins)
        statistics.update(first, log_px_z.reshape(rows, count), log_pz.T.contiguous(), log_qz.T.contiguous())
        if drawn is not None:
            drawn.update(points_first.double().reshape(rows, count, latent).permute(0, 2, 1).reshape(rows * latent, count))
    if found is None:
        mean = drawn.mean(samples).reshape(rows, latent)
        variance = (drawn.stderr(samples).square() * samples).nan_to_num(0.0).reshape(rows, latent)
    else:
        mean, variance = (value.double().expand(rows, latent) for value in found)
    return statistics.finish(analytic_kl, mean, variance)


def _linear_shortcut(model: Model, x: torch.Tensor, bins: Grid | None):
    """When the decoder ends in a linear layer and the family allows it, (trunk, head, x W, x . b)."""
    parts = model.linear_head()
    if parts is None or bins is not None or not model.likelihood.linear_shortcut:
        return None
    trunk, head = parts
    flat = x.reshape(x.shape[0], -1)
    projected, offset = rows_independently(lambda rows: model.likelihood.linear_projection(rows, head), flat)
    return trunk, head, projected, offset


def _check_finite(points: PointResults) -> None:
    for name in METRICS:
        values = getattr(points, name)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise VaeevalError(
                f"point {int(points.index[bad[0]])}: {name} is {values[bad[0]]} ({bad.size} point(s) affected); "
                "the model's outputs overflow on this data (an extreme log-variance, logit or scale)"
            )
