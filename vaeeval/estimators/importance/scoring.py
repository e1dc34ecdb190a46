"""What kind of number a model's score is on some data: a density or a probability.

A discrete family (Bernoulli, categorical, discretized logistic) gives the
log-probability of the data. A continuous family (Gaussian, Laplace,
continuous Bernoulli) gives a log-density, which is not a probability and is
comparable neither with probabilities nor, on discrete data, with other
densities. When the data is discrete (declared by the model or detected),
vaeeval scores a continuous family as the probability of each value's bin
instead, so that every model's number is the log-probability of the same
discrete event; ``--density`` keeps the density, ``--discretize L`` picks the
bins.
"""

from __future__ import annotations

import numpy as np

from vaeeval.errors import VaeevalError, option
from vaeeval.format.domains import Domain, Grid, describe_range, row_blocks
from vaeeval.format.likelihoods import Likelihood
from vaeeval.format.specs import MAX_LEVELS
from vaeeval.format.terms import DENSITY, PROBABILITY
from vaeeval.results.numbers import Scoring


def data_grid(likelihood: Likelihood, detected: Domain, declared: Domain | None) -> Grid | None:
    """The grid the data lies on: the model's declared one, else the one detected in the values
    (integers 0..255 read as 8-bit levels where a continuous family scores them)."""
    grid = (declared.grid if declared else None) or detected.grid
    if grid is None and likelihood.continuous:
        grid = detected.byte_grid()
    return grid


def off_grid(array: np.ndarray, grid: Grid) -> tuple[int, float] | None:
    """The first point (and its value) not on ``grid``, scanning the data block by block; None if all are."""
    for start, block in row_blocks(array):
        bad = grid.outside(block.reshape(block.shape[0], -1))
        if bad.any():
            row, column = np.argwhere(bad)[0]
            return start + int(row), float(block.reshape(block.shape[0], -1)[row, column])
    return None


def choose_scoring(
    likelihood: Likelihood,
    detected: Domain,
    declared: Domain | None = None,
    *,
    discretize: int | None = None,
    density: bool = False,
    grid_range: tuple[float, float] | None = None,
    array: np.ndarray | None = None,
) -> Scoring:
    """Decide how to score ``likelihood`` on data whose values have the ``detected`` domain.

    Args:
        likelihood: the model's likelihood.
        detected: the domain detected from the data's values.
        declared: the domain the model's ``data`` block declares, if any.
        discretize: score a continuous family on this many levels' bins.
        density: keep a continuous family's density even on discrete data.
        grid_range: the values [low, high] the ``discretize`` grid spans (default: the data's
            grid's range, else [0, 1]).
        array: the data, scanned to check it lies on a grid named by ``discretize`` and
            ``grid_range`` that its detected domain does not establish.

    Raises:
        VaeevalError: contradictory options, or bins the data is not on.
    """
    if discretize is not None and density:
        raise VaeevalError(f"{option('discretize')} and {option('density')} contradict each other: choose one")
    if discretize is not None and not 2 <= discretize <= MAX_LEVELS:
        raise VaeevalError(f"{option('discretize')} needs from 2 to {MAX_LEVELS} levels, found {discretize}")
    if grid_range is not None:
        _check_range(grid_range, discretize, likelihood)
    found = data_grid(likelihood, detected, declared)
    data_levels, span = (found.levels, (found.low, found.high)) if found else (None, (0.0, 1.0))
    family = likelihood.family
    if not likelihood.continuous:
        if discretize is not None and discretize != likelihood.levels:
            raise VaeevalError(
                f"{option('discretize')} {discretize}: the {family} model's own event is one of {likelihood.levels} levels"
            )
        return Scoring(PROBABILITY, None, data_levels, f"log-probabilities of the data ({family})", span)
    if density:
        return Scoring(DENSITY, None, data_levels, f"log-densities ({family}, forced by --density)", span)
    if discretize is None:
        if found is None:
            return Scoring(DENSITY, None, None, f"log-densities ({family}; the data is continuous)")
        return Scoring(PROBABILITY, found.levels, found.levels, _binned(found, family, "the data is discrete"), span)
    bins = Grid(discretize, *(grid_range or span))
    if found is not None and (found.low, found.high) == (bins.low, bins.high) and found.refined_by(discretize):
        return Scoring(PROBABILITY, discretize, found.levels, _binned(bins, family, "--discretize"), span)
    bad = None if array is None else off_grid(array, bins)
    if array is None or bad is not None:
        where = f"point {bad[0]} holds {bad[1]:.9g}; " if bad else ""
        raise VaeevalError(
            f"{option('discretize')} {discretize}: the data is not on the grid of {bins.describe()} "
            f"({where}it is {detected.describe()}); {option('range')} LO,HI names the values the grid spans"
        )
    return Scoring(PROBABILITY, discretize, discretize, _binned(bins, family, "--discretize"), (bins.low, bins.high))


def _check_range(grid_range: tuple[float, float], discretize: int | None, likelihood: Likelihood) -> None:
    low, high = grid_range
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise VaeevalError(f"{option('range')} {low:g},{high:g}: needs two finite numbers LO < HI")
    if discretize is None:
        raise VaeevalError(f"{option('range')} {describe_range(low, high)} is the span of a {option('discretize')} grid: give L too")
    if not likelihood.continuous:
        raise VaeevalError(f"{option('range')}: the {likelihood.family} model scores its own levels on [0, 1]")


def _binned(bins: Grid, family: str, source: str) -> str:
    return f"log-probabilities of each value's bin on {bins.describe()} ({family} density integrated; {source})"
