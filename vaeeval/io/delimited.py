"""CSV (and tab-separated) files of numbers as data: one point per line, read a block of lines at a time.

A first line that is not all numbers is a header and skipped; every other line holds
the same count of numbers, parsed as float64 (NumPy's ``loadtxt``, block by block, so a
file larger than ``--max-data-size`` is refused before it fills memory). Blank lines
and lines starting with ``#`` are skipped. No pandas.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO

import numpy as np

from vaeeval.errors import DataError, option
from vaeeval.io.files import reading

SUFFIXES = {".csv": ",", ".tsv": "\t"}
_BLOCK_LINES = 4096
_CONVERT = re.compile(r"could not convert string (.*) to float64 at row (\d+), column (\d+)")
_COLUMNS = re.compile(r"the number of columns changed from (\d+) to (\d+) at row (\d+)")


def is_delimited(path: Path) -> bool:
    """Whether ``path`` is named as a CSV (``.csv``) or tab-separated (``.tsv``) file."""
    return path.suffix.lower() in SUFFIXES


def read_delimited(path: Path, max_bytes: int) -> np.ndarray:
    """The numbers of a CSV or TSV file, ``[lines, values per line]`` float64.

    Raises:
        DataError: not text; a value that is not a number, a line with another count of
            values; no lines of numbers; more than ``max_bytes`` of float64.
    """
    separator = SUFFIXES[path.suffix.lower()]
    blocks: list[np.ndarray] = []
    held = 0
    width = None
    with reading(path, DataError, "data file"), path.open("r", encoding="utf-8", newline="") as handle:
        try:
            for first_line, lines in _blocks(handle, separator):
                block = _parse(path, lines, separator, first_line)
                if width is not None and block.shape[1] != width:
                    raise DataError(path, f"line {first_line} has {block.shape[1]} values; the lines before it have {width}")
                width = block.shape[1]
                held += block.nbytes
                if held > max_bytes:
                    raise DataError(path, f"holds more than {max_bytes:,} bytes of numbers as float64, the most allowed "
                                    f"({option('max_data_size')})")
                blocks.append(block)
        except UnicodeDecodeError:
            raise DataError(path, "is not text (UTF-8); a .csv data file holds numbers separated by commas") from None
    if not blocks:
        raise DataError(path, "holds no lines of numbers")
    return np.concatenate(blocks)


def _blocks(handle: IO[str], separator: str) -> Iterator[tuple[int, list[tuple[int, str]]]]:
    """``(first line number, [(line number, text)])`` blocks of the lines that hold values; a header line is left out."""
    numbered = ((number, text) for number, text in enumerate(handle, start=1) if text.strip() and not text.lstrip().startswith("#"))
    first = next(numbered, None)
    if first is None:
        return
    if not _all_numbers(first[1], separator):
        first = next(numbered, None)  # a header: the names of the columns
        if first is None:
            return
    pending = [first, *islice(numbered, _BLOCK_LINES - 1)]
    while pending:
        yield pending[0][0], pending
        pending = list(islice(numbered, _BLOCK_LINES))


def _all_numbers(text: str, separator: str) -> bool:
    try:
        [float(cell.strip().strip('"')) for cell in text.rstrip("\r\n").split(separator)]
    except ValueError:
        return False
    return True


def _parse(path: Path, lines: list[tuple[int, str]], separator: str, first_line: int) -> np.ndarray:
    try:
        return np.loadtxt([text for _, text in lines], delimiter=separator, dtype=np.float64, ndmin=2, quotechar='"',
                          comments="#")
    except ValueError as error:
        text = str(error)
        bad = _CONVERT.search(text)
        if bad:
            value, row, column = bad[1], int(bad[2]), int(bad[3])
            raise DataError(path, f"line {lines[row][0]}, value {column}: {value} is not a number") from None
        changed = _COLUMNS.search(text)
        if changed:
            before, after, row = (int(group) for group in changed.groups())
            raise DataError(path, f"line {lines[row - 1][0]} has {after} values; the lines before it have {before}") from None
        raise DataError(path, f"not a file of numbers separated by {separator!r} ({text.splitlines()[0]})") from None
