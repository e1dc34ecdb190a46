"""What the estimators report, as plain numbers: per-point columns declared once (``columns``), summaries and
diagnostics (``numbers``, ``psis``, ``latents``), their JSON-ready records and schemas, and what a results file
holds for each estimator (``formats``). NumPy; torch only where latent health draws from a prior.
"""
