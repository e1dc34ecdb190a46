"""Runs of any registered estimator: streamed to a results file, resumed, sharded and merged, or split across
torchrun ranks. Knows every estimator only through its ``results.formats.ResultsFormat``.
"""
