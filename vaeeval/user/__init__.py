"""The user's own code, run only when named with ``--arch``: loading their class, calling their ``encode`` and
``decode`` through the protocol, any torch.distributions they return, and where a model and its data come from.
"""
