"""The package's layers (pyproject.toml's import-linter contract) hold, and an upward import breaks the build."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vaeeval"
LINT_IMPORTS = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(where: Path) -> subprocess.CompletedProcess:
    return subprocess.run(LINT_IMPORTS, cwd=where, capture_output=True, text=True, env={"PYTHONPATH": str(where), "PATH": ""})


def test_every_import_runs_down_the_layers():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_an_upward_import_fails_naming_both_modules(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "vaeeval", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    numerics = tmp_path / "vaeeval" / "core" / "numerics.py"
    numerics.write_text(numerics.read_text() + "\nfrom vaeeval.runs import run  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "vaeeval.core.numerics -> vaeeval.runs.run" in done.stdout


def _runtime_imports(path: Path) -> set[str]:
    """Top-level modules a file imports at run time (not inside functions or under TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", ["errors.py", "io/files.py", "format/specs.py", "format/domains.py", "format/terms.py",
                                    "results/numbers.py", "results/psis.py", "results/recon_terms.py"])
def test_plain_number_modules_load_without_torch(module):
    """What reads files and holds results is NumPy only: `vaeeval merge` and `check` never need torch's kernels."""
    assert "torch" not in _runtime_imports(PACKAGE / module)



def test_no_module_is_over_500_lines():
    """A module that grows past this holds more than one idea: split it along the layer's lines."""
    long = {str(path.relative_to(ROOT)): n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long
