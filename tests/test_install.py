"""What users install: the wheel the release workflow builds, not editable, in fresh virtual environments, one per extra.
Each runs every console script and serves a model; [serve] stays free of torch and under 250 MB."""

import configparser
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, run_workflow_step, workflow_step
from mlops_basics.devtools.test_utils import free_port, http, running_server, tiny_serving_dir

CFG = configparser.ConfigParser()
CFG.read(ROOT / "settings.ini")
SCRIPTS = dict(s.split("=") for s in CFG["DEFAULT"]["console_scripts"].split())  # name -> module:function
# What each console script needs beyond the core; without it, --help fails naming the missing module.
NEEDS = {"mlops-train": "hydra", "mlops-export": "onnx", "mlops-serve": "fastapi", "mlops-deploy": "boto3", "mlops-sweep": "optuna"}
EXTRAS = {"serve": {"fastapi"}, "serve,lambda": {"fastapi", "boto3"}, "train": {"hydra", "onnx", "optuna"}}
HELP = {"mlops-train": "model: bert_tiny, minilm, mpnet"}  # Hydra's help has no usage line: it lists the packaged config groups
# [serve] under 250 MB; the Lambda image adds the runtime client and boto3 (about 35 MB), which reads the feedback key from Secrets Manager
SERVE_LIMIT_MB = {"serve": 250, "serve,lambda": 290}
REPORT = os.environ.get("MLOPS_INSTALL_REPORT")  # benchmarks/install_benchmark.py: where to write the measurements


def megabytes(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


@pytest.fixture(scope="session")
def bare_mb(tmp_path_factory) -> float:
    "What a fresh virtual environment holds before anything is installed (pip, setuptools): not part of any extra."
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return megabytes(site_packages(venv))


MEASURED: dict[str, dict] = {}


@pytest.fixture(scope="session")
def venvs(release_build, bare_mb):
    "extra -> a fresh virtual environment with the built wheel installed with that extra; [serve] by the release workflow's own step."
    made, wheel = {}, next((release_build / "dist").glob("*.whl"))

    def make(extra: str) -> Path:
        if extra in made:
            return made[extra]
        start, venv = time.perf_counter(), release_build.parent / extra.replace(",", "-")
        if extra == "serve":  # the workflow's step: the wheel with [serve], its commands, no torch
            proc = run_workflow_step(
                workflow_step("release.yml", "build", "Install the wheel and run its commands"),
                release_build,
                {"RUNNER_TEMP": str(release_build.parent)},
                timeout=900,
            )
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        else:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            torch = ["torch==2.13.0"] if "train" in extra else []  # first and pinned: never the CUDA build
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), *torch, f"{wheel}[{extra}]"],
                check=True,
                timeout=1800,
                env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},  # a checkout on PYTHONPATH would count as installed
            )
        MEASURED[extra] = {"install_s": round(time.perf_counter() - start, 1), "installed_mb": round(megabytes(site_packages(venv)) - bare_mb, 1)}
        made[extra] = venv
        return venv

    yield make
    if REPORT:
        Path(REPORT).write_text(json.dumps(MEASURED, indent=2) + "\n")


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    return tiny_serving_dir(tmp_path_factory.mktemp("model") / "serving")


def run_in(venv: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    "A command of the environment, from outside the checkout, with nothing of .venv on PATH."
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("extra", list(EXTRAS))
def test_the_wheel_installs_runs_every_command_and_serves(extra, venvs, model, tmp_path):
    venv = venvs(extra)
    where = run_in(venv, venv / "bin" / "python", "-c", "import mlops_basics; print(mlops_basics.__file__)", cwd=tmp_path)
    assert where.stdout.strip().startswith(str(site_packages(venv))), where  # the installed wheel, not the checkout
    for script in SCRIPTS:
        proc = run_in(venv, venv / "bin" / script, "--help", cwd=tmp_path)
        missing = NEEDS.get(script)
        if missing is None or missing in EXTRAS[extra]:
            assert proc.returncode == 0 and HELP.get(script, "usage") in proc.stdout.lower(), (script, proc.stderr[-2000:])
        else:
            assert proc.returncode != 0 and f"No module named '{missing}'" in proc.stderr, (script, proc.stderr[-2000:])
    if "serve" not in extra:
        return
    port = free_port()
    with running_server(
        [venv / "bin" / "mlops-serve", "--serving-dir", model, "--port", port],
        "/health",
        port,
        cwd=tmp_path,
        env={"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin"},
    ) as url:
        status, _, body = http(
            "POST", f"{url}/predict", json.dumps({"sentences": ["The cat sat on the mat."]}).encode(), {"Content-Type": "application/json"}
        )
        page = http("GET", f"{url}/")
    assert status == 200 and json.loads(body)["predictions"][0]["label"] in ("acceptable", "unacceptable"), body
    assert page[0] == 200 and b"<html" in page[2]  # the page, from inside the wheel


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["serve", "serve,lambda"])
def test_serving_extras_leave_out_torch_lightning_and_transformers_and_stay_small(extra, venvs, tmp_path):
    venv = venvs(extra)
    probe = "import importlib.util as u; print([m for m in ('torch', 'lightning', 'pytorch_lightning', 'transformers') if u.find_spec(m)])"
    assert run_in(venv, venv / "bin" / "python", "-c", probe, cwd=tmp_path).stdout.strip() == "[]"
    assert MEASURED[extra]["installed_mb"] < SERVE_LIMIT_MB[extra], MEASURED[extra]
    if extra == "serve,lambda":
        proc = run_in(venv, venv / "bin" / "python", "-c", "import awslambdaric, mlops_basics.serving.lambda_handler", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_wheel_holds_every_module_config_and_data_file(release_build):
    wheel = next((release_build / "dist").glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "mlops_basics"], cwd=ROOT, capture_output=True, text=True, check=True)
    package_files = {n for n in tracked.stdout.split() if (ROOT / n).is_file()}
    assert package_files and package_files <= names, sorted(package_files - names)
    assert {n for n in package_files if n.endswith(".yaml")} >= {"mlops_basics/conf/config.yaml", "mlops_basics/conf/model/mpnet.yaml"}
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


def wheel_contents(wheel: Path) -> dict[str, str]:
    "Each file of a wheel and its sha256, without RECORD (which only lists these)."
    with zipfile.ZipFile(wheel) as z:
        return {n: hashlib.sha256(z.read(n)).hexdigest() for n in z.namelist() if not n.endswith("/RECORD")}


def test_the_sdist_rebuilds_the_same_wheel(release_build, tmp_path):
    "`python -m build` made the wheel from the sdist; a wheel built straight from the checkout has the same files."
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(release_build)], check=True, capture_output=True, timeout=900
    )
    direct = next(tmp_path.glob("*.whl"))
    from_sdist = next((release_build / "dist").glob("*.whl"))
    assert wheel_contents(direct) == wheel_contents(from_sdist)
    with tarfile.open(next((release_build / "dist").glob("*.tar.gz"))) as sdist:
        members = {m.name.split("/", 1)[-1] for m in sdist.getmembers()}
    assert {"settings.ini", "README.md", "setup.py", "LICENSE", "CHANGELOG.md", "mlops_basics/conf/config.yaml"} <= members
