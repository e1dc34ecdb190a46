"""The user's files, read and written safely: regular files only, size limits, atomic writes, never an input
overwritten (``files``); AnnData ``.h5ad`` read a block of rows at a time (``h5ad``). No torch.
"""
