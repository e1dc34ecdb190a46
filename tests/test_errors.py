"""vaeeval.errors: messages name a parameter as the library caller knows it, or as its flag; listings."""

from __future__ import annotations

import numpy as np
import pytest

from vaeeval import DataError, ModelFileError, VaeevalError, load_data
from vaeeval.errors import listing, option, plain

MARK = "\x00"  # how option() marks a parameter inside a message


def test_a_library_message_names_the_parameter_and_the_command_line_its_flag():
    error = VaeevalError(f"{option('samples')} must be at least 1, found 0")
    assert str(error) == "samples must be at least 1, found 0"
    assert error.render(lambda name: "--" + name) == "--samples must be at least 1, found 0"
    assert error.render(lambda name: name.upper()) == "SAMPLES must be at least 1, found 0"


def test_every_marked_parameter_is_rendered_and_nothing_else():
    error = VaeevalError(f"{option('discretize')} and {option('batch_size')} contradict; samples stays a word")
    assert str(error) == "discretize and batch_size contradict; samples stays a word"
    assert error.render(lambda name: f"--{name.replace('_', '-')}") == "--discretize and --batch-size contradict; samples stays a word"
    assert plain(f"{option('key')}") == "key" and MARK not in plain(f"x {option('key')} y")


@pytest.mark.parametrize("kind", [DataError, ModelFileError])
def test_file_errors_keep_a_plain_reason_and_render_the_flag(kind):
    error = kind("data.npz", f"holds several arrays (a, b); choose one with {option('key')}")
    assert error.reason == "holds several arrays (a, b); choose one with key" and MARK not in error.reason
    assert str(error) == f"data.npz: {error.reason}"
    assert error.render(lambda name: "--" + name) == "data.npz: holds several arrays (a, b); choose one with --key"
    assert isinstance(error, VaeevalError) and error.path == "data.npz"
    assert str(kind(None, f"{option('key')} missing")) == "key missing"


def test_a_data_error_from_load_data_carries_no_marker(bernoulli_model, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 6), np.float32))
    with pytest.raises(DataError) as caught:
        load_data(tmp_path / "x.npy", bernoulli_model, key="train")
    assert caught.value.reason == "key selects an array of an .npz file, and this is not one"
    assert MARK not in str(caught.value) and MARK not in caught.value.reason


@pytest.mark.parametrize(
    ("names", "options", "shown"),
    [
        ([], {}, ""),
        (["a"], {}, "a"),
        (list("abcde"), {}, "a, b, c, d, e"),
        (list("abcdef"), {}, "a, b, c, d, e ..."),
        (list(range(12)), {}, "0, 1, 2, 3, 4 ..."),
        (list(range(12)), {"counted": True}, "0, 1, 2, 3, 4 and 7 more"),
        (list("abcde"), {"counted": True}, "a, b, c, d, e"),
        (list("abcd"), {"most": 2}, "a, b ..."),
        (list("abcd"), {"most": 2, "counted": True}, "a, b and 2 more"),
    ],
)
def test_listing(names, options, shown):
    assert listing(names, **options) == shown
