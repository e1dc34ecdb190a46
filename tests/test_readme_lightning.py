"""README's "From your framework" Lightning block and "Data you hold" block, run as written so they cannot rot."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli

pytest.importorskip("lightning")
pytest.importorskip("PIL")
pytest.importorskip("pyarrow")

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = "<!-- tests/test_readme_lightning.py runs this block and the commands after it -->"
DATA = "<!-- tests/test_readme_lightning.py runs this block and the commands after it (data) -->"


def _section(heading: str) -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(heading: str, marker: str) -> tuple[str, list[list[str]]]:
    """The ```python block after ``marker`` in the section, and the ``vaeeval`` commands of the ```sh block after it."""
    section = _section(heading)
    assert marker in section, f"README.md's {heading} section has lost the line {marker}"
    match = re.match(r"\n```python\n(.*?)```\s*\n```sh\n(.*?)```", section.split(marker, 1)[1], re.S)
    assert match, "the marked example is a ```python block, then a ```sh block"
    commands = [line.split("#", 1)[0].strip() for line in match.group(2).splitlines()]
    return match.group(1), [shlex.split(command) for command in commands if command]


def _vae_py() -> str:
    """The ``# vae.py`` block of "Your own architecture", which the Lightning block trains."""
    section = _section("## Your own architecture (`--arch`)")
    return re.search(r"```python\n(# vae\.py\n.*?)```", section, re.S).group(1)


def _run(code: str, name: str, folder: Path) -> None:
    sys.path.insert(0, str(folder))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            exec(compile(code, f"README.md ({name})", "exec"), {"__name__": "readme_example"})
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("vae", None)


def test_readme_lightning_block_runs(tmp_path, monkeypatch):
    code, commands = _blocks("## From your framework", LIGHTNING)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae.py").write_text(_vae_py())
    _run(code, "PyTorch Lightning", tmp_path)
    assert (tmp_path / "last.ckpt").is_file()
    np.save(tmp_path / "mnist_test.npy", (np.random.default_rng(0).random((16, 784)) < 0.3).astype(np.float32))
    assert [command[:3] for command in commands] == [["vaeeval", "convert", "--from"], ["vaeeval", "elbo", "vae_weights.safetensors"],
                                                     ["vaeeval", "convert", "--from"], ["vaeeval", "elbo", "vae.safetensors"]]
    extracted = cli(*commands[0][1:]).stdout
    assert "prefix 'vae.' stripped" in extracted
    fast = ["-k", "16", "--json"]
    via_arch = json.loads(cli(*commands[1][1:], *fast).stdout)
    read, wrote = cli(*commands[2][1:]).stdout.splitlines()
    assert read.startswith("read last.ckpt's state_dict") and wrote.startswith("wrote vae.safetensors: format 1")
    converted = json.loads(cli(*commands[3][1:], *fast).stdout)
    np.testing.assert_allclose([p["iwae"] for p in converted["points"]], [p["iwae"] for p in via_arch["points"]], rtol=1e-5)


def test_readme_data_block_runs(tmp_path, monkeypatch):
    code, commands = _blocks("## Data you hold", DATA)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_models").mkdir()
    for name in ("digits_binary_test.npy", "digits_bernoulli.safetensors"):
        shutil.copy(ROOT / "sample_models" / name, tmp_path / "sample_models")
    _run(code, "Data you hold", tmp_path)
    fast = ["-k", "8", "--limit", "40", "--json"]
    expected = json.loads(cli("elbo", "sample_models/digits_bernoulli.safetensors", "sample_models/digits_binary_test.npy",
                              *fast).stdout)["points"]
    assert len(commands) == 3
    for command in commands:
        assert command[:2] == ["vaeeval", "elbo"]
        assert json.loads(cli(*command[1:], *fast).stdout)["points"] == expected, command
