"""The shipped data files are what ``sample_models/train.py`` makes, byte for byte in value."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _train_script():
    spec = importlib.util.spec_from_file_location("sample_train", SAMPLES / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # imports as the script does: a moved vaeeval name fails here
    return module


def test_shipped_data_files_are_the_scripts_splits():
    train = _train_script()
    splits = train.digit_splits()
    made = {}
    for model in train.SAMPLE_MODELS:
        made.update(train.data_files(model, splits))
    assert set(made) == {"digits_binary_test.npy", "digits_grey_test.npy", "digits_grey_valid.npy"}
    for name, array in made.items():
        shipped = np.load(SAMPLES / name)
        assert shipped.dtype == np.float32 and np.array_equal(shipped, array), name
    valid, test = np.load(SAMPLES / "digits_grey_valid.npy"), np.load(SAMPLES / "digits_grey_test.npy")
    assert valid.shape == (200, 64) and not (valid[:, None, :] == test[None, :, :]).all(-1).any()  # no test image reused
