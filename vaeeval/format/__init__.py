"""Format 1 (FORMAT.md), the public contract: the layer table, the likelihood families and priors (each a
registry), domains, a model read from and written to a ``.safetensors`` file, and data checked against a model.
Nothing here runs code from a file.
"""
