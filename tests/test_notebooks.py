"""Every notebook runs top to bottom under nbdev_test (its examples are its tests); slow cells run in slow tests."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN

NOTEBOOKS = sorted(p for p in (ROOT / "nbs").glob("*.ipynb") if not p.name.startswith("_"))


def has_flag(notebook: Path, flag: str) -> bool:
    cells = json.loads(notebook.read_text())["cells"]
    return any(cell["cell_type"] == "code" and any(line.strip() == f"#| {flag}" for line in "".join(cell["source"]).splitlines()) for cell in cells)


# Pages whose framework cannot share .venv (its pins clash with constraints.txt) run in their own environment.
OWN_VENV = {"13_orchestration": "prefect_python", "13a_prefect_server": "prefect_python", "13b_workers": "prefect_python", "13c_closing_the_loop": "prefect_python"}


def nbdev_test(notebook: Path, *flags: str, bin_dir: Path = BIN):
    proc = subprocess.run(
        [str(bin_dir / "nbdev_test"), "--path", str(notebook), "--n_workers", "0", *(["--flags", " ".join(flags)] if flags else [])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, f"{notebook.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def bin_dir_for(notebook: Path, request) -> Path:
    "The bin directory of the environment the page runs in: .venv's, or the one its fixture in OWN_VENV makes."
    return request.getfixturevalue(OWN_VENV[notebook.stem]).parent if notebook.stem in OWN_VENV else BIN


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(notebook, request):
    nbdev_test(notebook, bin_dir=bin_dir_for(notebook, request))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", [p for p in NOTEBOOKS if has_flag(p, "slow")], ids=lambda p: p.stem)
def test_notebook_slow_cells(notebook, request):
    nbdev_test(notebook, "slow", bin_dir=bin_dir_for(notebook, request))


def test_notebooks_are_clean_tutorial_pages():
    "Each notebook opens with a '# Week …' (or project) title and a one-line summary, and has at most one parameters cell."
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        first = "".join(cells[0]["source"])
        assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), notebook.name
        assert "\n> " in first, f"{notebook.name}: the title cell needs a '> summary' line"
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) <= 1, notebook.name


def test_scaffolding_is_hidden():
    "Test imports, the IN_TEST switch, environment set-up and cells of checks only carry `#| hide` (tools/hide_scaffolding.py)."
    proc = subprocess.run([str(BIN / "python"), "tools/hide_scaffolding.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"run `python tools/hide_scaffolding.py` and commit:\n{proc.stdout}"
