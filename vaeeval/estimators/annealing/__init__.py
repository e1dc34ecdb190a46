"""Annealed importance sampling with HMC (Neal 2001; Wu et al. 2017): the kernel and schedules (``kernel``),
the AIS evaluator (``ais``), its BDMC sandwich on simulated points (``bdmc``).
"""
