"""The package's architecture, as `.importlinter` states it: layers that import one way, a serving path without torch, no cycles.
import-linter checks the package itself; each contract is also shown to fail on a copy of the package with one deliberate violation."""

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

LINT_IMPORTS = ROOT / ".venv" / "bin" / "lint-imports"


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    "import-linter on the package under `cwd` (its .importlinter), the package found there first."
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)}
    )


def test_the_package_keeps_every_contract():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


@pytest.fixture
def package_copy(tmp_path) -> Path:
    "A copy of the package and its contracts, to break on purpose."
    shutil.copytree(ROOT / "mlops_basics", tmp_path / "mlops_basics", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def add_import(copy: Path, module: str, line: str) -> None:
    "Append an import `line` to `module` (dotted, under mlops_basics) in the copy."
    path = copy / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n{line}\n")


@pytest.mark.parametrize(
    "module, line, broken, names",
    [
        (
            "mlops_basics.core.artifacts",
            "from mlops_basics.ops.release import lambda_function",
            ["Layers go one way", "ops goes one way"],  # and so models (which use core) would reach release
            "mlops_basics.core.artifacts -> mlops_basics.ops.release.lambda_function",
        ),
        (
            "mlops_basics.serving.predictor",
            "from mlops_basics.training import model",
            ["Layers go one way", "Serving (and the core below it)"],
            "mlops_basics.serving.predictor -> mlops_basics.training.model",
        ),
        ("mlops_basics.serving.batching", "import torch", ["Serving (and the core below it)"], "mlops_basics.serving.batching -> torch"),
        ("mlops_basics.serving.settings", "from mlops_basics.serving import app", ["No import cycles"], ".settings -> .app"),
        (
            "mlops_basics.ops.models.card",
            "from mlops_basics.ops.release import traffic",
            ["No import cycles", "ops goes one way"],  # release uses the model registry: a cycle too
            "mlops_basics.ops.models.card -> mlops_basics.ops.release.traffic",
        ),
        ("mlops_basics.ops.monitoring.shipping", "from mlops_basics.ops.monitoring import drift", ["No import cycles"], ".shipping -> .drift"),
    ],
)
def test_a_deliberate_violation_breaks_its_contract(package_copy, module, line, broken, names):
    assert lint_imports(package_copy).returncode == 0  # the copy keeps them all, as the package does
    add_import(package_copy, module, line)
    proc = lint_imports(package_copy)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"Contracts: {4 - len(broken)} kept, {len(broken)} broken." in proc.stdout, proc.stdout[-3000:]
    report = proc.stdout.split("Broken contracts")[1]
    assert all(name in report for name in broken) and names in report, report
