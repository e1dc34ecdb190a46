"""Annealed importance sampling with HMC (Neal 2001; Wu et al. 2017): the kernel, schedules and the
fitted schedule (``kernel``), where chains start (``start``), the AIS evaluator and its pilots (``ais``),
its BDMC sandwich on simulated points (``bdmc``), settings certified to a target gap (``certify``).
"""
