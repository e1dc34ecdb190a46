"""Per-token numbers of padded sequences (``--lengths``): NLL per token, perplexity, bits per token.

Sentence-VAE papers report the data set's negative log-likelihood per token and its
perplexity, exp(total NLL / total tokens) (Bowman et al. 2016; He et al. 2019, "Lagging
inference networks"), not a mean of per-sentence ratios: a long sentence weighs by its tokens.
Here total NLL is -sum_i iwae_i (the IWAE's estimate of log p(x); in expectation a lower bound,
so NLL per token and perplexity are upper bounds in expectation), and beside it the same from
the ELBO (a bound by construction). Standard errors are the delta method's for a ratio of
means over points: se(R) = sqrt(sum_i (a_i - R t_i)^2 / (n (n - 1))) / mean(t), with a_i the
point's NLL and t_i its tokens; perplexity's is exp(R) se(R).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vaeeval.results.numbers import Stat, exact_sum


@dataclass(frozen=True)
class SequenceSummary:
    """The data set per token: ``tokens`` in all; NLL per token (nats), perplexity and bits per token,
    from ``estimate`` (``iwae``, or an AIS run's ``ais``: ``nll_per_token``, ...) and from the ELBO
    (``elbo_nll_per_token``, ``elbo_perplexity``)."""

    tokens: int
    nll_per_token: Stat
    perplexity: Stat
    bits_per_token: Stat
    elbo_nll_per_token: Stat
    elbo_perplexity: Stat
    estimate: str = "iwae"


def per_token(nll: np.ndarray, tokens: np.ndarray) -> Stat:
    """sum_i nll_i / sum_i tokens_i, exactly rounded sums (the same bits in any order), with its delta-method error."""
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    total = exact_sum(tokens)
    ratio = exact_sum(nll) / total
    n = nll.size
    if n < 2:
        return Stat(ratio, None)
    residual = nll - ratio * tokens
    return Stat(ratio, math.sqrt(exact_sum(residual * residual) / (n * (n - 1))) / (total / n))


def _exp(stat: Stat) -> Stat:
    value = math.exp(stat.mean)
    return Stat(value, None if stat.stderr is None else value * stat.stderr)


def sequence_summary(log_px: np.ndarray, elbo: np.ndarray, tokens: np.ndarray, estimate: str = "iwae") -> SequenceSummary:
    """The per-token numbers of points with these estimates of log p(x) (``estimate``: ``iwae`` or ``ais``), these
    ELBOs and these token counts."""
    nll, elbo_nll = per_token(-log_px, tokens), per_token(-elbo, tokens)
    bits = Stat(nll.mean / math.log(2), None if nll.stderr is None else nll.stderr / math.log(2))
    return SequenceSummary(int(exact_sum(tokens)), nll, _exp(nll), bits, elbo_nll, _exp(elbo_nll), estimate)


def note(sequences: SequenceSummary) -> str:
    """What the per-token numbers are, in a sentence (JSON's ``summary.sequences.note``)."""
    return (f"per token over the data set: -sum({sequences.estimate}) / sum(tokens) nats (elbo_: of -sum(elbo)), "
            "perplexity its exp, bits its / ln 2; the positions past each --lengths are not tokens")


def sequence_rows(sequences: SequenceSummary) -> list[tuple[str, Stat, str]]:
    """The summary table's rows for padded sequences, in place of bits/dim: (label, stat, meaning)."""
    tokens, estimate = f"{sequences.tokens} tokens", sequences.estimate
    return [
        ("NLL/token", sequences.nll_per_token, f"-Σ {estimate} / Σ tokens, nats ({tokens}; padding not counted)"),
        ("perplexity", sequences.perplexity, f"exp(NLL/token), from {estimate}"),
        ("bits/token", sequences.bits_per_token, "NLL/token / ln 2"),
        ("ELBO NLL/token", sequences.elbo_nll_per_token, "-Σ elbo / Σ tokens, an upper bound"),
        ("ELBO perplexity", sequences.elbo_perplexity, "exp(ELBO NLL/token)"),
    ]
