"""The import direction of DESIGN.md (core <- serve <- tui), checked by import-linter.

import-linter reads the package from the file system; an editable install maps ``spkft.*`` to the
repository folders with an import hook it cannot follow, so the check runs on a staged copy laid
out as installed (``spkft/core``, ``spkft/serve``, ``spkft/tui``) with the project's contracts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = 3


def lint_staged_copy(tmp_path: Path, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    package = tmp_path / "src" / "spkft"
    for name in ("core", "serve", "tui"):
        shutil.copytree(ROOT / name, package / name, ignore=shutil.ignore_patterns("__pycache__"))
    for relative, text in (extra or {}).items():
        (package / relative).write_text(text)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    runner = (
        f"import sys; sys.path.insert(0, {str(tmp_path / 'src')!r}); "
        "from importlinter.cli import lint_imports_command; lint_imports_command()"
    )
    return subprocess.run([sys.executable, "-c", runner, "--no-cache"], cwd=tmp_path, capture_output=True, text=True)


def test_layering_contracts_hold(tmp_path):
    result = lint_staged_copy(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {CONTRACTS} kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    "module, line, contract",
    [
        ("core/_violation.py", "import typer\n", "core is a library"),
        ("core/_violation.py", "import spkft.tui\n", "layers: tui above serve above core"),
        ("serve/_violation.py", "import rich\n", "serve has no terminal interface"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path, module, line, contract):
    result = lint_staged_copy(tmp_path, {module: line})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and contract in result.stdout
