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

from vaeeval.errors import VaeevalError, option
from vaeeval.format.domains import Domain
from vaeeval.format.likelihoods import Likelihood
from vaeeval.format.specs import MAX_LEVELS
from vaeeval.format.terms import DENSITY, PROBABILITY
from vaeeval.results.numbers import Scoring


def _on_grid(detected: Domain, levels: int) -> bool:
    found = detected.grid_levels
    return found is not None and (levels - 1) % (found - 1) == 0


def choose_scoring(
    likelihood: Likelihood,
    detected: Domain,
    declared: Domain | None = None,
    *,
    discretize: int | None = None,
    density: bool = False,
) -> Scoring:
    """Decide how to score ``likelihood`` on data whose values have the ``detected`` domain.

    Args:
        likelihood: the model's likelihood.
        detected: the domain detected from the data's values.
        declared: the domain the model's ``data`` block declares, if any.
        discretize: score a continuous family on this many levels' bins.
        density: keep a continuous family's density even on discrete data.

    Raises:
        VaeevalError: contradictory options, or bins the data is not on.
    """
    if discretize is not None and density:
        raise VaeevalError(f"{option('discretize')} and {option('density')} contradict each other: choose one")
    if discretize is not None and not 2 <= discretize <= MAX_LEVELS:
        raise VaeevalError(f"{option('discretize')} needs from 2 to {MAX_LEVELS} levels, found {discretize}")
    data_levels = (declared.grid_levels if declared else None) or detected.grid_levels
    family = likelihood.family
    if not likelihood.continuous:
        if discretize is not None and discretize != likelihood.levels:
            raise VaeevalError(
                f"{option('discretize')} {discretize}: the {family} model's own event is one of {likelihood.levels} levels"
            )
        return Scoring(PROBABILITY, None, data_levels, f"log-probabilities of the data ({family})")
    if density:
        return Scoring(DENSITY, None, data_levels, f"log-densities ({family}, forced by --density)")
    levels = discretize if discretize is not None else data_levels
    if levels is None:
        return Scoring(DENSITY, None, None, f"log-densities ({family}; the data is continuous)")
    if not _on_grid(detected, levels):
        raise VaeevalError(
            f"{option('discretize')} {levels}: the data is not on the grid k/{levels - 1} "
            f"(it is {detected.describe()})"
        )
    source = "--discretize" if discretize is not None else "the data is discrete"
    return Scoring(
        PROBABILITY,
        levels,
        data_levels or levels,
        f"log-probabilities of each value's bin on {levels} levels ({family} density integrated; {source})",
    )
