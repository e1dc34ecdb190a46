"""Data in the forms users hold it, beside ``.npy``/``.npz`` and ``.h5ad``: which reader a path needs, and what is refused.

A folder is a dataset ``datasets``' ``save_to_disk`` wrote (``arrow``) or a folder of
PNG/JPEG images (``images``); a file is parquet or Arrow by its first bytes
(``arrow``), CSV/TSV by its name (``delimited``). A ``torch.save`` file is refused,
naming the way out: vaeeval never unpickles.
"""

from __future__ import annotations

import shlex
import zipfile
from pathlib import Path

import numpy as np

from vaeeval.errors import DataError, option
from vaeeval.io.arrow import is_arrow, is_saved_dataset, read_saved_dataset, read_table
from vaeeval.io.delimited import is_delimited, read_delimited
from vaeeval.io.h5ad import Rows
from vaeeval.io.images import is_image, read_images


def read_folder(folder: Path, key: str | None, max_bytes: int) -> Rows:
    """A saved Hugging Face dataset's column ``key``, else the folder's images.

    Raises:
        DataError: as ``arrow.read_saved_dataset`` or ``images.read_images``; ``key`` with images.
    """
    if is_saved_dataset(folder):
        return read_saved_dataset(folder, key, max_bytes)
    if key is not None:
        raise DataError(folder, f"{option('key')} selects a column of a parquet or arrow file or a saved dataset; a folder "
                        "of images has none")
    return read_images(folder, max_bytes)


def read_other(path: Path, magic: bytes, key: str | None, max_bytes: int) -> Rows | np.ndarray | None:
    """Parquet, Arrow or CSV data (None: none of them).

    Raises:
        DataError: ``key`` with a CSV; a single image; as the readers.
    """
    if is_arrow(magic):
        return read_table(path, magic, key, max_bytes)
    if is_image(magic):
        raise DataError(path, "a single image; give the folder holding the images (one point per image, sorted by name)")
    if is_delimited(path):
        if key is not None:
            raise DataError(path, f"{option('key')} selects a column of a parquet or arrow file; a CSV file is read whole")
        return read_delimited(path, max_bytes)
    return None


def is_torch_zip(path: Path) -> bool:
    """Whether a zip archive is a ``torch.save`` file (its pickle is ``<name>/data.pkl``)."""
    try:
        with path.open("rb") as handle, zipfile.ZipFile(handle) as archive:
            return any(name == "data.pkl" or name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def torch_file(path: Path) -> DataError:
    """The refusal of a ``torch.save`` file given as data, with the two ways out."""
    quoted = shlex.quote(str(path))
    return DataError(
        path, "a torch.save file (tensors in a pickle), which vaeeval never unpickles; save the tensor as an array: "
        f"numpy.save('data.npy', torch.load({str(path)!r}, weights_only=True).numpy()); a model's checkpoint is MODEL, "
        f"not DATA: vaeeval convert --from lightning {quoted} --arch FILE.py:CLASS --state-dict -o weights.safetensors"
    )
