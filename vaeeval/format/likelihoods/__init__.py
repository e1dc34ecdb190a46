"""Observation models p(x|z): family name -> the log-probability of one data point.

Each family registers itself. It knows how many decoder outputs it takes per
data dimension (P), which tensors of the file it reads, what data it supports,
and whether its numbers are densities or probabilities. Log-probabilities are
the full normalized ones, from torch.distributions where torch has a correct
one, evaluated elementwise and summed over the data dimensions in float64.

A continuous family can also score each dimension as the probability of the
data's bin (FORMAT.md, "Discrete data under a continuous density"): the bin of
value v on L levels is [v - 1/(2(L-1)), v + 1/(2(L-1))], the outermost bins
reaching to the ends of the family's support. Those probabilities are computed
in float64 from log-CDFs in forms that never subtract two nearly equal numbers.
"""

import importlib

from vaeeval.format.likelihoods.base import (
    BINARY,
    CATEGORICAL,
    Likelihood,
    families,
    family,
    likelihood_from_spec,
    likelihood_spec,
    register,
)

# Each family registers itself when its module is imported: this order is the order families() lists them in
# (the CLI's --likelihood choices, the "known:" of an error).
for _module in ("bernoulli", "grid", "location_scale", "continuous_bernoulli", "counts"):
    importlib.import_module(f"{__name__}.{_module}")

from vaeeval.format.likelihoods.bernoulli import BernoulliLikelihood  # noqa: E402
from vaeeval.format.likelihoods.continuous_bernoulli import ContinuousBernoulliLikelihood, StableContinuousBernoulli  # noqa: E402
from vaeeval.format.likelihoods.counts import COUNT_FAMILIES  # noqa: E402
from vaeeval.format.likelihoods.grid import CategoricalLikelihood, DiscretizedLogisticLikelihood  # noqa: E402
from vaeeval.format.likelihoods.location_scale import GaussianLikelihood, LaplaceLikelihood  # noqa: E402

__all__ = [
    "BINARY",
    "CATEGORICAL",
    "COUNT_FAMILIES",
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "ContinuousBernoulliLikelihood",
    "DiscretizedLogisticLikelihood",
    "GaussianLikelihood",
    "LaplaceLikelihood",
    "Likelihood",
    "StableContinuousBernoulli",
    "families",
    "family",
    "likelihood_from_spec",
    "likelihood_spec",
    "register",
]
