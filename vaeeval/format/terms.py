"""The words vaeeval's numbers are reported in, shared by every layer from format 1 up.

A log-likelihood is a log-density (nats with respect to Lebesgue measure) or a
log-probability (nats of a discrete event): the two are never compared. A KL
term is analytic (closed form) or a Monte Carlo estimate with its standard error.
"""

from __future__ import annotations

DENSITY = "density"  # nats with respect to Lebesgue measure
PROBABILITY = "probability"  # nats of a discrete event
MEASURES = (DENSITY, PROBABILITY)
ANALYTIC = "analytic"  # KL(q || p) in closed form
MONTE_CARLO = "monte_carlo"  # KL(q || p) estimated from the samples, with its standard error
KL_KINDS = (ANALYTIC, MONTE_CARLO)
GIVEN_DRAWS = "analytic_given_draws"  # a hierarchical latent group's KL: the closed form at q's draws of its parents
