"""The README's save_model example with a learned prior, run verbatim so it cannot rot."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import torch
from conftest import cli

from vaeeval import load_model

ROOT = Path(__file__).resolve().parents[1]
# The README puts this comment on the line before the example's ```python fence.
MARKER = "<!-- tests/test_readme_examples.py runs this block and the two commands after it -->"


def _section(readme: str, heading: str) -> str:
    """The text of a ``## heading`` section, up to the next ``## `` heading."""
    return readme.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def _marked_example() -> tuple[str, list[str]]:
    """The Python block after MARKER in "## Model files", and the ``vaeeval`` commands of the sh block after it."""
    section = _section((ROOT / "README.md").read_text(), "## Model files")
    assert MARKER in section, f"README.md's Model files section has lost the line {MARKER}"
    after = section.split(MARKER, 1)[1]
    match = re.match(r"\n```python\n(.*?)```\s*\n```sh\n(.*?)```", after, re.S)
    assert match, "the marked example is a ```python block, then a ```sh block"
    commands = [line.split("#", 1)[0].strip() for line in match.group(2).splitlines()]
    return match.group(1), [command for command in commands if command]


def test_readme_save_model_example_runs(tmp_path, monkeypatch):
    code, commands = _marked_example()
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng(devices=[]):  # the example seeds torch's global generator: not for the other tests
        exec(compile(code, "README.md (Model files)", "exec"), {"__name__": "readme_example"})

    model = load_model(tmp_path / "mog.safetensors")
    assert model.prior.family == "mixture_of_gaussians"
    assert model.latent_dim == 2
    assert model.encoder[-1].out_features == 2 * model.latent_dim
    assert tuple(model.prior.values["means"].shape) == (3, 2)

    (tmp_path / "sample_models").mkdir()
    shutil.copy(ROOT / "sample_models" / "digits_binary_test.npy", tmp_path / "sample_models")
    assert [shlex.split(command)[:2] for command in commands] == [["vaeeval", "inspect"], ["vaeeval", "elbo"]]
    inspected = cli(*shlex.split(commands[0])[1:]).stdout
    assert "mixture_of_gaussians" in inspected and "monte_carlo" in inspected
    evaluated = cli(*shlex.split(commands[1])[1:], "-k", "32", "--limit", "16").stdout  # fewer samples: fast
    assert "mixture_of_gaussians" in evaluated and "iwae" in evaluated
