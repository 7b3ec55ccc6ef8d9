"""`make test` finds CoLA in each form the README names: nothing set (the zip `make run` cached), or MLOPS_COLA_PATH at the zip or at its raw/ directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def run_pytest(env: dict, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.fixture()
def layouts(cola_zip, tmp_path):
    "A download cache as `make run` leaves it, a lone zip, and an unzipped release beside its zip; an empty cache."
    (tmp_path / "cache").mkdir()
    shutil.copy(cola_zip, tmp_path / "cache" / "cola_public_1.1.zip")
    (tmp_path / "zip").mkdir()
    shutil.copy(cola_zip, tmp_path / "zip" / "cola_public_1.1.zip")
    (tmp_path / "unzipped").mkdir()
    shutil.copy(cola_zip, tmp_path / "unzipped" / "cola_public_1.1.zip")
    with zipfile.ZipFile(cola_zip) as z:
        z.extractall(tmp_path / "unzipped")
    (tmp_path / "empty-cache").mkdir()
    return tmp_path


FORMS = {
    "nothing set, after make run": ("cache", None),
    "the zip": ("empty-cache", "zip/cola_public_1.1.zip"),
    "its raw/ directory": ("empty-cache", "unzipped/cola_public/raw"),
}


@pytest.mark.slow
@pytest.mark.parametrize("form", FORMS)
def test_data_tests_and_week_0a_page_pass_with(form, layouts):
    cache, cola = FORMS[form]
    env = {k: v for k, v in os.environ.items() if k not in ("MLOPS_COLA_PATH", "PYTEST_CURRENT_TEST")}
    env["MLOPS_CACHE_DIR"] = str(layouts / cache)
    if cola:
        env["MLOPS_COLA_PATH"] = str(layouts / cola)
    probe = subprocess.run(
        [sys.executable, "-c", "import conftest, os; print(os.environ['MLOPS_COLA_PATH'])"],
        cwd=ROOT / "tests",
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == str(layouts / (cola or "cache/cola_public_1.1.zip")), probe.stdout  # the form given, not the shared copy
    proc = run_pytest(env, "tests/test_data.py", "tests/test_notebooks.py::test_notebook[00a_data]")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
