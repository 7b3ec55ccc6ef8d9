"""Shared set-up for the test suite: offline, quiet, on the shared CoLA copy, tiny models on one thread."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_COLA = ROOT.parent/"shared"/"data"/"cola"

# Fail fast instead of reaching for the Hub, keep W&B local, and keep tokenizers quiet after forks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MLOPS_COLA_PATH" not in os.environ and SHARED_COLA.exists(): os.environ["MLOPS_COLA_PATH"] = str(SHARED_COLA)

BIN = Path(sys.executable).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def cola_path() -> Path:
    "The local CoLA copy (a directory with the raw TSVs and the release zip)."
    path = Path(os.environ.get("MLOPS_COLA_PATH", ""))
    if not path.exists(): pytest.fail(f"CoLA copy not found: set MLOPS_COLA_PATH (tried {path})")
    return path


@pytest.fixture(scope="session")
def cola_zip(cola_path) -> Path:
    zips = [cola_path] if cola_path.suffix == ".zip" else sorted(cola_path.glob("*.zip"))
    if not zips: pytest.fail(f"no CoLA release zip in {cola_path}")
    return zips[0]


def run_cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    "Run an installed console script (from this interpreter's bin directory)."
    command = [str(BIN/args[0]), *map(str, args[1:])]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


TINY_TRAIN = ["model=tiny_random", "logger=none", "trainer.num_threads=1", "trainer.enable_progress_bar=false",
              "trainer.enable_model_summary=false"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    "An artifacts directory of a tiny random model trained for a few batches by `mlops-train`."
    root = tmp_path_factory.mktemp("tiny-run")
    proc = run_cli("mlops-train", *TINY_TRAIN, "trainer.max_epochs=1", "trainer.limit_train_batches=4", f"paths.root={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root/"model"
