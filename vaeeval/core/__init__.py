"""The bottom layer: exp, log, the normal quantile and tree sums with the same bits on every CPU (``numerics``),
and counter-based noise keyed by (seed, point, sample) (``rng``). Imports nothing of vaeeval.
"""
