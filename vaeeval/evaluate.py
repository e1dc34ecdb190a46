"""The batched, chunked evaluation loop: model + data -> per-point arrays -> summary.

Points are taken ``batch_size`` at a time (one encoder pass per batch), and
their K samples ``chunk_size`` at a time, so memory is bounded by
batch x chunk whatever K is. Noise for sample k of point i comes from
``rng.standard_normal`` keyed by (seed, i, k), and reductions over samples run
in fixed blocks, so results do not depend on the batch or chunk size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch.distributions import Independent, Normal

from vaeeval.data import Dataset, Domain, detect_domain
from vaeeval.errors import VaeevalError
from vaeeval.estimators import (
    BLOCK,
    Moments,
    effective_sample_size,
    fold_logsumexp,
    fold_logsumexp_prefixes,
    iwae_bound,
    iwae_stderr,
    log_weights,
)
from vaeeval.psis import pareto_khat, reliability_threshold, top_size
from vaeeval.model import Model, rows_independently
from vaeeval.rng import standard_normal
from vaeeval.scoring import Scoring, choose_scoring

DEFAULT_SAMPLES = 1000
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_MEMORY = 512 * 2**20
METRICS = ("elbo", "recon", "kl", "iwae")


@dataclass(frozen=True)
class Settings:
    """How an evaluation was run."""

    samples: int
    seed: int
    batch_size: int
    chunk_size: int
    device: str


@dataclass(frozen=True)
class PointResults:
    """Per-point estimates in nats, ``[N]`` float64 each, higher is better (but ``kl``).

    Diagnostics per point: ``elbo_stderr`` and ``kl_stderr`` are Monte Carlo standard
    errors over the K samples (``kl_stderr`` 0 when the KL is analytic); ``iwae_stderr``
    the delta-method standard error sqrt(1/ESS - 1/K); ``ess`` the effective sample
    size of the importance weights; ``khat`` their Pareto tail shape (``psis``), with
    ``unreliable`` where it exceeds ``psis.reliability_threshold(K)``.
    """

    index: np.ndarray
    elbo: np.ndarray
    recon: np.ndarray
    kl: np.ndarray
    iwae: np.ndarray
    kl_stderr: np.ndarray
    elbo_stderr: np.ndarray
    iwae_stderr: np.ndarray
    ess: np.ndarray
    khat: np.ndarray
    unreliable: np.ndarray

    @classmethod
    def concatenate(cls, parts: Sequence[PointResults]) -> PointResults:
        """The points of several parts, in the order given."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def take(self, rows: np.ndarray) -> PointResults:
        """These rows, in this order."""
        return type(self)(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


@dataclass(frozen=True)
class Stat:
    """Mean over points and its standard error (``None`` for a single point)."""

    mean: float
    stderr: float | None


@dataclass(frozen=True)
class Diagnostics:
    """How far to trust the numbers, over the data set.

    ``gap`` is iwae - elbo, a lower bound on the inference gap E_q[log q(z|x) / p(z|x)];
    ``unreliable`` lists the flagged points, worst (largest k-hat) first.
    """

    threshold: float
    unreliable: tuple[int, ...]
    share: float
    gap: Stat
    ess: Stat
    ess_fraction: Stat
    khat: Stat
    elbo_stderr: Stat
    iwae_stderr: Stat


@dataclass(frozen=True)
class Summary:
    """Means and standard errors over points.

    ``bits_per_dim`` is -iwae / (D ln 2). For a density on discrete data,
    ``dequantized_bits_per_dim`` is the same for iwae + D log(bin width), the
    figure usually reported for densities on dequantized data.
    """

    n: int
    elbo: Stat
    recon: Stat
    kl: Stat
    iwae: Stat
    bits_per_dim: Stat
    diagnostics: Diagnostics
    dequantized_bits_per_dim: Stat | None = None


@dataclass(frozen=True)
class Convergence:
    """IWAE from nested subsets of each point's samples: the first k of them, for k in ``samples``."""

    samples: tuple[int, ...]
    iwae: np.ndarray  # [N, len(samples)]

    def summary(self) -> list[tuple[int, Stat]]:
        """Mean and standard error over points of the IWAE at each k."""
        return [(k, mean_and_stderr(self.iwae[:, j])) for j, k in enumerate(self.samples)]


@dataclass(frozen=True)
class Evaluation:
    """Everything one ``evaluate`` call found."""

    points: PointResults
    summary: Summary
    settings: Settings
    scoring: Scoring  # what kind of number recon and iwae are, and how it was made
    kl_kind: str  # "analytic" or "monte_carlo"
    domain: Domain  # the data's values, as detected
    convergence: Convergence | None = None  # None when read back from per-point records
    latent_means: np.ndarray | None = None  # [N, latent_dim], the encoder's q(z|x) means
    latent_vars: np.ndarray | None = None  # [N, latent_dim], and variances

    @property
    def measure(self) -> str:
        """``"density"`` or ``"probability"``."""
        return self.scoring.measure


def mean_and_stderr(values: np.ndarray) -> Stat:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(n))."""
    values = np.asarray(values, dtype=np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else None
    return Stat(float(values.mean()), stderr)


def diagnose(points: PointResults, samples: int) -> Diagnostics:
    """The data set's diagnostics from the per-point ones."""
    flagged = np.flatnonzero(points.unreliable)
    worst_first = flagged[np.argsort(-points.khat[flagged], kind="stable")]
    finite_khat = points.khat[np.isfinite(points.khat)]
    return Diagnostics(
        threshold=reliability_threshold(samples),
        unreliable=tuple(int(points.index[i]) for i in worst_first),
        share=float(flagged.size / max(points.index.size, 1)),
        gap=mean_and_stderr(points.iwae - points.elbo),
        ess=mean_and_stderr(points.ess),
        ess_fraction=mean_and_stderr(points.ess / samples),
        khat=mean_and_stderr(finite_khat) if finite_khat.size else Stat(math.nan, None),
        elbo_stderr=mean_and_stderr(points.elbo_stderr) if samples > 1 else Stat(math.nan, None),
        iwae_stderr=mean_and_stderr(points.iwae_stderr),
    )


def summarize(
    points: PointResults, dims: int, samples: int, dequantization_offset: float | None = None
) -> Summary:
    """Means and standard errors over points, bits per dimension of -iwae, and diagnostics.

    Args:
        points: the per-point estimates.
        dims: D, dimensions per point.
        samples: K, samples per point.
        dequantization_offset: D log(bin width), for a density on discrete data.
    """
    per_dim = dims * math.log(2)
    return Summary(
        n=int(points.index.size),
        elbo=mean_and_stderr(points.elbo),
        recon=mean_and_stderr(points.recon),
        kl=mean_and_stderr(points.kl),
        iwae=mean_and_stderr(points.iwae),
        bits_per_dim=mean_and_stderr(-points.iwae / per_dim),
        diagnostics=diagnose(points, samples),
        dequantized_bits_per_dim=(
            None
            if dequantization_offset is None
            else mean_and_stderr(-(points.iwae + dequantization_offset) / per_dim)
        ),
    )


def convergence_checkpoints(samples: int) -> tuple[int, ...]:
    """1, 10, 100, ... below K, and K."""
    return tuple(10**j for j in range(int(math.log10(samples)) + 1) if 10**j < samples) + (samples,)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked to exist here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VaeevalError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VaeevalError(f"--device {name}: no CUDA device is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise VaeevalError(f"--device {name}: vaeeval runs on cpu or cuda")
    return device


def _row_bytes(model: Model) -> int:
    """Rough working memory of one (point, sample) row through the decoder and likelihood."""
    widest = max(model.decoder_width, model.likelihood.params_per_dim * model.data_dims)
    dims = model.data_dims
    return 4 * (2 * widest + (model.likelihood.params_per_dim + 4) * dims) + 8 * (2 * dims + 8 * model.latent_dim)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc reuse freed tensor memory instead of unmapping it (once per process; Linux only).

    Each chunk allocates and frees the same few tensors of some megabytes. By default
    glibc serves those with fresh ``mmap``s, which the kernel zeroes page by page on
    first touch: a quarter of the run time on the benchmark. Raising the mmap and trim
    thresholds (as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` would) keeps
    them in the heap for reuse. This is process-wide; peak memory is unchanged.

    Returns:
        Whether the setting could be made (False off glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False


# Rows (points x samples) per decoder call: large enough for efficient matrix products,
# small enough that the elementwise passes after them run from cache (measured on the
# MNIST-size benchmark: 2-3k rows are fastest, 13k rows 25% slower).
TARGET_ROWS = 3072


def chunk_size_for(model: Model, batch_size: int, samples: int, max_memory: int) -> int:
    """Samples per chunk: whole blocks, about ``TARGET_ROWS`` rows, within ``max_memory``; at least one block."""
    fitting = max_memory // (_row_bytes(model) * batch_size)
    wanted = max(TARGET_ROWS // batch_size, 1)
    blocks = max(1, min(fitting // BLOCK, wanted // BLOCK, math.ceil(samples / BLOCK)))
    return blocks * BLOCK


@dataclass(frozen=True)
class Part:
    """The results for some of the points: a batch, a shard, or what a stopped run had done."""

    points: PointResults
    convergence: np.ndarray  # [n, len(checkpoints)]
    latent_means: np.ndarray  # [n, latent_dim]
    latent_vars: np.ndarray


class Evaluator:
    """An evaluation made ready: settings checked, scoring chosen, the model on its device.

    ``parts`` evaluates any subset of the points, batch by batch; ``finish`` turns the
    parts into one ``Evaluation``. Every point's numbers depend only on the seed and its
    index, so parts computed in any order, by any process, combine into the numbers of
    one uninterrupted run. Creating one calls ``keep_freed_memory`` (a process-wide
    glibc setting that makes the chunked loop about a quarter faster).

    Args:
        model: a loaded model.
        data: ``[N, *input_shape]`` points, already checked (``load_data``).
        samples: K, importance samples per point.
        seed: 0 <= seed < 2**64; with it the point indices key the noise.
        batch_size: points per encoder pass.
        max_memory: bytes the decoder working set may use; sets the chunk size.
        chunk_size: samples per chunk (a multiple of ``estimators.BLOCK``), instead of ``max_memory``.
        device: where to compute.
        discretize: score a continuous likelihood as bin probabilities on this many levels.
        density: keep a continuous likelihood's density even when the data is discrete.

    Raises:
        VaeevalError: bad settings.
    """

    def __init__(
        self,
        model: Model,
        data: Dataset | np.ndarray,
        *,
        samples: int = DEFAULT_SAMPLES,
        seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_memory: int = DEFAULT_MAX_MEMORY,
        chunk_size: int | None = None,
        device: str | torch.device = "cpu",
        discretize: int | None = None,
        density: bool = False,
    ) -> None:
        keep_freed_memory()
        self.array = data.array if isinstance(data, Dataset) else np.asarray(data)
        if samples < 1 or batch_size < 1:
            raise VaeevalError("--samples and --batch-size must be at least 1")
        if not 0 <= seed < 2**64:
            raise VaeevalError(f"--seed must be between 0 and 2**64 - 1, found {seed}")
        if chunk_size is None:
            chunk_size = chunk_size_for(model, batch_size, samples, max_memory)
        elif chunk_size < 1 or chunk_size % BLOCK:
            raise VaeevalError(f"the chunk size must be a positive multiple of {BLOCK}, found {chunk_size}")
        self.domain = data.domain if isinstance(data, Dataset) else detect_domain(self.array)
        self.scoring = choose_scoring(model.likelihood, self.domain, model.domain, discretize=discretize, density=density)
        device = resolve_device(str(device))
        self.model = model.to(device)
        self.settings = Settings(samples, seed, batch_size, chunk_size, str(device))
        self.checkpoints = convergence_checkpoints(samples)

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
        settings, device = self.settings, self.settings.device
        with torch.inference_mode():
            for start in range(0, indices.size, settings.batch_size):
                rows = indices[start : start + settings.batch_size]
                contiguous = bool(np.all(np.diff(rows) == 1))  # a slice reads a memory map without a copy
                batch = self.array[rows[0] : rows[-1] + 1] if contiguous else self.array[rows]
                x = torch.from_numpy(np.array(batch, dtype=np.float32)).to(device)
                found = _evaluate_batch(
                    self.model, x, rows, settings.samples, settings.seed, settings.chunk_size,
                    self.scoring.levels, self.checkpoints,
                )
                found = {name: values.cpu().numpy() for name, values in found.items()}
                khat = pareto_khat(found.pop("top_log_w"), settings.samples)
                part = Part(
                    points=PointResults(
                        index=rows.copy(),
                        khat=khat,
                        unreliable=khat > reliability_threshold(settings.samples),
                        **{name: found.pop(name) for name in _POINT_COLUMNS},
                    ),
                    convergence=found.pop("convergence"),
                    latent_means=found.pop("q_mean"),
                    latent_vars=found.pop("q_var"),
                )
                _check_finite(part.points)
                yield part
                if progress is not None:
                    progress(start + rows.size)

    def finish(self, parts: Sequence[Part]) -> Evaluation:
        """One evaluation from parts covering each point once, in index order."""
        gathered = PointResults.concatenate([p.points for p in parts])
        order = np.argsort(gathered.index, kind="stable")
        points = gathered.take(order)
        dims = self.model.data_dims
        return Evaluation(
            points=points,
            summary=summarize(points, dims, self.settings.samples, self.scoring.dequantization_offset(dims)),
            settings=self.settings,
            scoring=self.scoring,
            kl_kind=self.model.prior.kl_kind,
            domain=self.domain,
            convergence=Convergence(self.checkpoints, np.concatenate([p.convergence for p in parts])[order]),
            latent_means=np.concatenate([p.latent_means for p in parts])[order],
            latent_vars=np.concatenate([p.latent_vars for p in parts])[order],
        )


_POINT_COLUMNS = ("elbo", "recon", "kl", "iwae", "kl_stderr", "elbo_stderr", "iwae_stderr", "ess")


def evaluate(
    model: Model,
    data: Dataset | np.ndarray,
    *,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> Evaluation:
    """Estimate ELBO, reconstruction, KL and IWAE, with their diagnostics, for every point.

    Args:
        model: a loaded model.
        data: ``[N, *input_shape]`` points, already checked (``load_data``).
        progress: called with the number of points finished after each batch.
        **options: ``samples``, ``seed``, ``batch_size``, ``max_memory``, ``chunk_size``,
            ``device``, ``discretize``, ``density``: see ``Evaluator``.

    Returns:
        Per-point estimates (points numbered by their row in ``data``) and their summary.

    Raises:
        VaeevalError: bad settings, or a point whose estimate is not finite.
    """
    evaluator = Evaluator(model, data, **options)
    return evaluator.finish(list(evaluator.parts(progress=progress)))


class _SampleStatistics:
    """Everything kept per point while its K samples stream past in chunks: O(1) in K but the tail."""

    def __init__(
        self, rows: int, samples: int, checkpoints: tuple[int, ...], like: torch.Tensor, monte_carlo_kl: bool
    ) -> None:
        self.samples, self.checkpoints, self.monte_carlo_kl = samples, checkpoints, monte_carlo_kl
        empty = torch.full((rows,), -math.inf, dtype=torch.float64, device=like.device)
        self.log_sum_w, self.log_sum_w2 = empty, empty.clone()
        self.top = torch.empty((rows, 0), dtype=torch.float64, device=like.device)
        self.recon, self.log_w, self.log_ratio = Moments(), Moments(), Moments()
        self.prefixes: dict[int, torch.Tensor] = {}

    def update(self, first: int, log_px_z: torch.Tensor, log_pz: torch.Tensor, log_qz: torch.Tensor) -> None:
        log_w = log_weights(log_px_z, log_pz, log_qz)
        self.log_sum_w, prefixes = fold_logsumexp_prefixes(self.log_sum_w, log_w, first, self.checkpoints)
        self.prefixes.update(prefixes)
        self.log_sum_w2 = fold_logsumexp(self.log_sum_w2, 2 * log_w)
        kept = torch.cat([self.top, log_w], dim=1)
        self.top = torch.topk(kept, min(top_size(self.samples), kept.shape[1]), dim=1).values
        self.recon.update(log_px_z)
        if self.monte_carlo_kl:  # the KL and the ELBO's error then come from these samples
            self.log_w.update(log_w)
            self.log_ratio.update(log_qz - log_pz)

    def finish(self, analytic_kl: torch.Tensor | None) -> dict[str, torch.Tensor]:
        samples = self.samples
        recon = self.recon.mean(samples)
        if analytic_kl is None:  # Monte Carlo KL from the same samples: the ELBO is the mean log-weight
            kl, kl_stderr, elbo_stderr = self.log_ratio.mean(samples), self.log_ratio.stderr(samples), self.log_w.stderr(samples)
        else:
            kl, kl_stderr, elbo_stderr = analytic_kl, torch.zeros_like(analytic_kl), self.recon.stderr(samples)
        ess = effective_sample_size(self.log_sum_w, self.log_sum_w2)
        return {
            "elbo": recon - kl,
            "recon": recon,
            "kl": kl,
            "iwae": iwae_bound(self.log_sum_w, samples),
            "kl_stderr": kl_stderr,
            "elbo_stderr": elbo_stderr,
            "iwae_stderr": iwae_stderr(ess, samples),
            "ess": ess,
            "top_log_w": self.top,
            "convergence": torch.stack(
                [iwae_bound(self.prefixes[k] if k < samples else self.log_sum_w, k) for k in self.checkpoints], dim=1
            ),
        }


def _evaluate_batch(
    model: Model,
    x: torch.Tensor,
    indices: np.ndarray,
    samples: int,
    seed: int,
    chunk_size: int,
    levels: int | None,
    checkpoints: tuple[int, ...],
) -> dict[str, torch.Tensor]:
    """The estimates and diagnostics, ``[B, ...]`` float64, for one batch of points ``x``."""
    mean, log_var = model.encode(x)
    mean, std = mean.double(), (0.5 * log_var.double()).exp()
    analytic_kl = model.prior.kl(Independent(Normal(mean, std, validate_args=False), 1))
    q = Independent(Normal(mean[:, None], std[:, None], validate_args=False), 1)
    prior = model.prior.distribution(mean)

    rows, latent = mean.shape
    statistics = _SampleStatistics(rows, samples, checkpoints, mean, monte_carlo_kl=analytic_kl is None)
    x_each = x[:, None]
    shortcut = _linear_shortcut(model, x, levels)
    for first in range(0, samples, chunk_size):
        last = min(samples, first + chunk_size)
        eps = standard_normal(seed, indices, first, last, latent).to(x.device)
        z = (mean[:, None] + std[:, None] * eps).to(torch.float32)  # the decoder's input...
        z64 = z.double()  # ...and exactly that point for the densities
        if shortcut is None:
            params = model.decode(z.reshape(-1, latent)).reshape(rows, last - first, *model.decode_shape)
            log_px_z = model.likelihood.log_prob(params, x_each, levels)
        else:
            trunk, head, projected, offset = shortcut
            hidden, logits = model.decode_through_head(z.reshape(-1, latent), trunk, head)
            log_px_z = model.likelihood.log_prob_through_linear(
                hidden.reshape(rows, last - first, -1), logits.reshape(rows, last - first, -1), projected, offset
            )
        statistics.update(first, log_px_z, prior.log_prob(z64), q.log_prob(z64))
    return {**statistics.finish(analytic_kl), "q_mean": mean, "q_var": std * std}


def _linear_shortcut(model: Model, x: torch.Tensor, levels: int | None):
    """When the decoder ends in a linear layer and the family allows it, (trunk, head, x W, x . b)."""
    parts = model.linear_head()
    if parts is None or levels is not None or not model.likelihood.linear_shortcut:
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
