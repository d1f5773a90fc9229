"""The import contracts in pyproject.toml ([tool.importlinter]) hold: commands above the benchmark, methods/ and
evaluation/ siblings that never import each other, both above selection, training and teachers, all above the
artefact; the method families never import each other; the shared utilities import no layer.  ``lint-imports``
checks them, and fails on a broken one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(folder: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` (import-linter) run on the package and pyproject.toml in ``folder``."""
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache"]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_method_that_imports_evaluation_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "ssdd", tmp_path / "ssdd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    coreset = tmp_path / "ssdd" / "methods" / "coreset.py"
    coreset.write_text(coreset.read_text() + "\nfrom ssdd.evaluation.baselines import BASELINES  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "ssdd.methods.coreset -> ssdd.evaluation.baselines" in result.stdout


def test_a_method_family_that_imports_another_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "ssdd", tmp_path / "ssdd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    dm = tmp_path / "ssdd" / "methods" / "feature_matching" / "dm.py"
    dm.write_text(dm.read_text() + "\nfrom ssdd.methods.kernel_ridge.krr import krr_outer_loss  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "the method families never import each other" in result.stdout and "BROKEN" in result.stdout
    assert "ssdd.methods.feature_matching.dm -> ssdd.methods.kernel_ridge.krr" in result.stdout
