"""Streaming reductions: the same answer whatever the chunking, and the same as one big reduction."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaeeval.core.numerics import fold_, row_sums
from vaeeval.estimators.weights import (
    BLOCK,
    LogSumExp,
    fold_sum,
    iwae_bound,
    log_weights,
)


def _streamed(values: torch.Tensor, chunk: int, fold, start: float) -> torch.Tensor:
    total = torch.full((values.shape[0],), start, dtype=torch.float64)
    for first in range(0, values.shape[1], chunk):
        total = fold(total, values[:, first : first + chunk])
    return total


def _streamed_lse(values: torch.Tensor, chunk: int, checkpoints: tuple[int, ...] = ()) -> tuple[LogSumExp, dict]:
    state, prefixes = LogSumExp(values.shape[0], values), {}
    for first in range(0, values.shape[1], chunk):
        prefixes.update(state.update(values[:, first : first + chunk], first, checkpoints))
    return state, prefixes


@settings(max_examples=40, deadline=None)
@given(
    samples=st.integers(1, 700),
    chunks=st.lists(st.integers(1, 12), min_size=2, max_size=2),
    seed=st.integers(0, 1000),
)
def test_streaming_is_bitwise_chunk_independent_and_matches_one_reduction(samples, chunks, seed):
    generator = torch.Generator().manual_seed(seed)
    log_w = torch.randn(3, samples, generator=generator, dtype=torch.float64) * 30 - 100
    sums = [_streamed(log_w, c * BLOCK, fold_sum, 0.0) for c in chunks]
    checkpoints = tuple(k for k in (1, 10, 100) if k < samples)
    streamed = [_streamed_lse(log_w, c * BLOCK, checkpoints) for c in chunks]
    (first, prefixes), (second, other_prefixes) = streamed
    assert torch.equal(sums[0], sums[1]) and torch.equal(first.log_sum(), second.log_sum())
    assert torch.equal(first.effective_sample_size(), second.effective_sample_size())
    assert all(torch.equal(prefixes[k], other_prefixes[k]) for k in checkpoints)
    torch.testing.assert_close(sums[0], log_w.sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(first.log_sum(), torch.logsumexp(log_w, 1), rtol=1e-12, atol=1e-12)
    for k in checkpoints:
        torch.testing.assert_close(prefixes[k], torch.logsumexp(log_w[:, :k], 1), rtol=1e-12, atol=1e-12)
    ess = torch.exp(2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1))
    torch.testing.assert_close(first.effective_sample_size(), ess, rtol=1e-10, atol=0)


def test_logsumexp_is_stable_far_from_zero():
    log_w = torch.tensor([[-1e4, -1e4 + math.log(3.0)]], dtype=torch.float64)
    state, _ = _streamed_lse(log_w, BLOCK)
    assert state.log_sum().item() == -1e4 + math.log(4.0) and state.effective_sample_size().item() == pytest.approx(1.6, rel=1e-14)


def test_iwae_of_equal_weights_is_the_weight():
    log_w = torch.full((2, 1000), -7.25, dtype=torch.float64)
    state, _ = _streamed_lse(log_w, 3 * BLOCK)
    torch.testing.assert_close(iwae_bound(state.log_sum(), 1000), torch.full((2,), -7.25, dtype=torch.float64))
    torch.testing.assert_close(state.effective_sample_size(), torch.full((2,), 1000.0, dtype=torch.float64))


def test_log_weights_is_the_importance_ratio():
    px, pz, qz = (torch.tensor([v]) for v in (-3.0, -1.5, -2.0))
    assert log_weights(px, pz, qz).item() == -3.0 - 1.5 + 2.0


@settings(max_examples=40, deadline=None)
@given(dims=st.integers(1, 3000), rows=st.integers(1, 5), seed=st.integers(0, 1000))
def test_row_sums_are_float64_accurate_and_row_independent(dims, rows, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, dims, generator=generator) * 10
    exact = values.double().sum(-1)
    found = row_sums(values)
    assert torch.equal(found, row_sums(values.clone(), consume=True))
    assert all(torch.equal(found[i : i + 1], row_sums(values[i : i + 1])) for i in range(rows))
    # float32 pairwise partial sums of at most dims/32 terms: errors of a few float32 ulps of the partials
    torch.testing.assert_close(found, exact, rtol=0, atol=1e-6 * float(values.abs().sum(-1).max()) + 1e-12)


@given(dims=st.integers(1, 5000), most=st.integers(2, 40))
@settings(max_examples=60, deadline=None)
def test_fold_multiplies_every_factor_once_and_caps_the_terms(dims, most):
    powers = torch.arange(dims, dtype=torch.float64)  # fold by adding exponents: each column's count
    counts = fold_(torch.ones(1, dims, dtype=torch.float64), torch.add, most=most)
    assert counts.sum().item() == dims and counts.max().item() <= most
    products = fold_((2.0 ** (powers / dims))[None].clone(), torch.mul, most=most)
    assert math.isclose(products.log2().sum().item(), (dims - 1) / 2, rel_tol=1e-12, abs_tol=1e-12)
