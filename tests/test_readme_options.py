"""README.md's option tables say what click says: every flag a row names exists, with click's default.

A table is one whose header is ``| option | default | meaning |``; the command it documents is
named by the nearest line above it, in the same section, that starts with `` `vaeeval COMMAND``.
Options a table leaves out are not checked here: only the rows present must be right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest

from vaeeval.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# How a default cell reads when click's default is "no value".
#   A blank cell: nothing is set; click's default is None, False (a flag) or () (a repeatable option).
#   These words: click's default is None, and the command works the value out at run time.
#   (A required option's cell says "required".) Any other cell is read by the option's own click type
#   ("512M" -> 536870912, "1000" -> 1000, a choice as its string) and must equal click's default;
#   where --help shows a default as text (show_default="512M"), the cell must be that text.
NONE_WORDS = {
    "all": "--limit: every point",
    "half the memory": "--max-data-size: a limit from the machine's memory",
    "tuned": "--step-size of ais: a pilot run tunes it per point and step",
    "planned": "--batch-size of ais: as many points as the memory budget holds",
}

_HEADER = re.compile(r"^\|\s*option\s*\|\s*default\s*\|\s*meaning\s*\|\s*$")
_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|){3}\s*$")
_NAMING = re.compile(r"^`vaeeval ([a-z][a-z-]*)")
_CELL_BORDER = re.compile(r"(?<!\\)\|")  # a "\|" inside a cell is text, not a border
_OPTION_CELL = re.compile(r"^`[^`]+`(\s*,\s*`[^`]+`)*$")


@dataclass(frozen=True)
class Row:
    """One row of an option table."""

    command: str
    line: int  # in README.md, from 1
    flags: tuple[str, ...]  # every flag the option cell names: ("-k", "--samples")
    default: str  # the default cell as written, without backticks
    meaning: str


def option_rows(text: str) -> list[Row]:
    """Every row of every ``| option | default | meaning |`` table in ``text``, with its command."""
    lines = text.splitlines()
    rows = []
    for index, line in enumerate(lines):
        if not _HEADER.match(line):
            continue
        assert _RULE.match(lines[index + 1]), f"README.md line {index + 2}: the option table's header rule"
        command = _command_above(lines, index)
        body = index + 2
        while body < len(lines) and lines[body].startswith("|"):
            rows.append(_row(command, body + 1, lines[body]))
            body += 1
    return rows


def _command_above(lines: list[str], index: int) -> str:
    for line in reversed(lines[:index]):
        if line.startswith("#"):
            break
        if match := _NAMING.match(line):
            return match.group(1)
    raise AssertionError(f"README.md line {index + 1}: no line above this option table, in its section, names `vaeeval COMMAND`")


def _row(command: str, number: int, line: str) -> Row:
    cells = [cell.strip() for cell in _CELL_BORDER.split(line.strip())[1:-1]]
    assert len(cells) == 3, f"README.md line {number}: an option row has 3 cells, found {len(cells)}"
    options, default, meaning = cells
    assert _OPTION_CELL.match(options), f"README.md line {number}: the option cell is `--flag ARG`s, comma-separated: {options!r}"
    flags = tuple(written.split()[0] for written in re.findall(r"`([^`]+)`", options))
    return Row(command, number, flags, default.strip("`").strip(), meaning)


def click_default(command: click.Command, param: click.Option) -> Any:
    """What click passes ``command`` for ``param`` when it is not on the command line (converted by its type)."""
    ctx = click.Context(command)
    value, _ = param.consume_value(ctx, {})
    return param.process_value(ctx, value)


def row_problems(row: Row) -> list[str]:
    """What is wrong with ``row`` by click's definition of its command; empty when it is right."""
    where = f"README.md line {row.line}, vaeeval {row.command}"
    command = main.all_commands().get(row.command)
    if command is None:
        return [f"{where}: there is no command {row.command!r}"]
    options = {flag: param for param in command.params if isinstance(param, click.Option) for flag in param.opts}
    problems = [f"{where}: no option {flag}" for flag in row.flags if flag not in options]
    for param in dict.fromkeys(options[flag] for flag in row.flags if flag in options):
        problems += [f"{where}, {param.opts[-1]}: {problem}" for problem in _default_problems(row, command, param)]
    return problems


def _default_problems(row: Row, command: click.Command, param: click.Option) -> list[str]:
    written = row.default
    if param.required:
        return [] if written == "required" else [f"the option is required, the README says {written!r}, not 'required'"]
    default = click_default(command, param)
    problems = []
    if isinstance(param.show_default, str) and written != param.show_default:
        problems.append(f"the README says {written!r}, --help says (default: {param.show_default})")
    if isinstance(param.type, click.Choice):
        named = set(re.findall(r"`([^`]+)`", row.meaning))
        if named and named != set(param.type.choices):
            problems.append(f"the README names the choices {sorted(named)}, click's are {sorted(param.type.choices)}")
    if written == "":
        if not (default is None or default is False or default == ()):  # not `in`: 0 == False
            problems.append(f"the README leaves the default blank, click's default is {default!r}")
    elif written in NONE_WORDS:
        if default is not None:
            problems.append(f"the README says {written!r} (a default of None), click's default is {default!r}")
    else:
        try:
            value = param.type.convert(written, param, None)  # as click reads it: "512M" -> bytes, "1000" -> 1000
        except click.BadParameter as error:
            problems.append(f"the README's default {written!r} is not a value of this option ({error.message})")
        else:
            if value != default or type(value) is not type(default):
                problems.append(f"the README says {written!r}, click's default is {default!r}")
    return problems


ROWS = option_rows(README.read_text())


def test_readme_has_option_tables():
    assert {row.command for row in ROWS} >= {"elbo", "ais"}


@pytest.mark.parametrize("row", ROWS, ids=lambda row: f"{row.command} {' '.join(row.flags)}")
def test_readme_option_row_matches_click(row):
    problems = row_problems(row)
    assert not problems, "\n".join(problems)


# The checks above must fail when a default changes on one side only.


def _option(command: str, flag: str) -> click.Option:
    return next(param for param in main.all_commands()[command].params if flag in param.opts)


def _rows_of(command: str, flag: str, text: str | None = None) -> list[Row]:
    rows = ROWS if text is None else option_rows(text)
    return [row for row in rows if row.command == command and flag in row.flags]


@pytest.mark.parametrize(
    ("command", "flag", "changed"),
    [("elbo", "--samples", 999), ("elbo", "--max-memory", "256M"), ("elbo", "--density", True),
     ("ais", "--step-size", 0.01), ("ais", "--schedule", "linear"), ("elbo", "--limit", 10)],
)
def test_a_default_changed_in_click_alone_fails(monkeypatch, command, flag, changed):
    [row] = _rows_of(command, flag)
    assert not row_problems(row)
    monkeypatch.setattr(_option(command, flag), "default", changed)
    assert row_problems(row)


@pytest.mark.parametrize(
    ("command", "flag", "before", "after"),
    [("ais", "--steps", "| `--steps T` | 500 |", "| `--steps T` | 400 |"),
     ("elbo", "--max-memory", "| `--max-memory` | 512M |", "| `--max-memory` | 1G |"),
     ("ais", "--init", "| `--init` | auto |", "| `--init` | prior |"),
     ("elbo", "--density", "| `--density` | |", "| `--density` | on |"),
     ("ais", "--batch-size", "| `--batch-size` | planned |", "| `--batch-size` | 32 |"),
     ("elbo", "--seed", "| `--seed` | 0 |", "| `--seed` | |"),
     ("elbo", "-k", "`-k`, `--samples`", "`-k`, `--sample`")],
    ids=["steps 400", "max-memory 1G", "init prior", "density on", "batch-size 32", "seed blank", "flag renamed"],
)
def test_a_default_changed_in_the_readme_alone_fails(command, flag, before, after):
    text = README.read_text()
    assert before in text
    changed = _rows_of(command, flag, text.replace(before, after))
    assert changed and all(row_problems(row) for row in changed)
