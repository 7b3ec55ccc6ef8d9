"""Shared set-up for the test suite: offline, quiet, on the shared CoLA copy, tiny models on one thread."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The shared helpers live in the package (nbs/97_test_utils.ipynb); the tests import them from here or from there.
from mlops_basics.core.data import COLA_ENV_VAR, default_cache_dir
from mlops_basics.devtools.test_utils import TINY_TRAIN, cola_copies, moto_server as _moto_server, run_cli, serve

ROOT = Path(__file__).resolve().parents[1]
SHARED_COLA = ROOT.parent / "shared" / "data" / "cola"

# Fail fast instead of reaching for the Hub, keep W&B local, and keep tokenizers quiet after forks.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # boto3 must never probe an instance metadata address
# CoLA: $MLOPS_COLA_PATH as given (the zip or its raw/ directory), else the zip `make run` cached, else the shared copy beside the checkout.
CACHED_COLA = default_cache_dir() / "cola_public_1.1.zip"
if not os.environ.get(COLA_ENV_VAR):
    if CACHED_COLA.is_file():
        os.environ[COLA_ENV_VAR] = str(CACHED_COLA)
    elif SHARED_COLA.exists():
        os.environ[COLA_ENV_VAR] = str(SHARED_COLA)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what they will
def pytest_collection_modifyitems(config, items):
    "A page's slow run executes every cell of its plain run as well (test_plain_runs_need_no_slow_cell): when both are selected, run it once."
    slow_runs = {item.callspec.params["notebook"] for item in items if item.originalname == "test_notebook_slow_cells"}
    covered = [item for item in items if item.originalname == "test_notebook" and item.callspec.params["notebook"] in slow_runs]
    if covered:
        config.hook.pytest_deselected(items=covered)
        items[:] = [item for item in items if item not in covered]


PREFECT_VENV = ROOT / ".venv-prefect"  # Prefect 3's pins clash with .venv's: the orchestration extra has its own (see the Makefile)


def make_environment(target: str, timeout: int = 1200) -> None:
    "Run `make TARGET`, which makes a virtual environment of its own when it is missing or out of date."
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), target], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"make {target} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def prefect_python() -> Path:
    "The Python of .venv-prefect, made by `make prefect-venv` when missing or out of date."
    make_environment("prefect-venv", timeout=1800)
    return PREFECT_VENV / "bin" / "python"


@pytest.fixture(scope="session")
def mlserver_bin() -> Path:
    "MLServer in its own environment (`make mlserver`: .venv-mlserver, made once and kept)."
    make_environment("mlserver")
    return ROOT / ".venv-mlserver" / "bin" / "mlserver"


@pytest.fixture(scope="session")
def mlflow_server_bin() -> Path:
    "MLflow's server in its own environment (`make registry-venv`: .venv-registry, made once and kept)."
    make_environment("registry-venv")
    return ROOT / ".venv-registry" / "bin" / "mlflow"


@pytest.fixture(scope="session")
def cola_path() -> Path:
    "The local CoLA copy the tests read: $MLOPS_COLA_PATH, the release zip or a directory of its raw TSVs."
    path = Path(os.environ.get(COLA_ENV_VAR, ""))
    if not os.environ.get(COLA_ENV_VAR) or not path.exists():
        pytest.fail(f"CoLA copy not found (tried {path}): run `make run` online once (it caches the release zip), or set {COLA_ENV_VAR}")
    return path


@pytest.fixture(scope="session")
def cola_copy_pair(cola_path, tmp_path_factory) -> tuple[Path, Path]:
    "(release zip, directory of its raw TSVs): the form $MLOPS_COLA_PATH does not give is derived (see `cola_copies`)."
    return cola_copies(tmp_path_factory.mktemp("cola"))


@pytest.fixture(scope="session")
def cola_zip(cola_copy_pair) -> Path:
    return cola_copy_pair[0]


@pytest.fixture(scope="session")
def cola_raw(cola_copy_pair) -> Path:
    return cola_copy_pair[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    "An artifacts directory of a tiny random model trained for a few batches by `mlops-train`."
    root = tmp_path_factory.mktemp("tiny-run")
    proc = run_cli("mlops-train", *TINY_TRAIN, "trainer.max_epochs=1", "trainer.limit_train_batches=4", f"paths.root={root}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "model"


@pytest.fixture(scope="session")
def serving_dir(tiny_model_dir, tmp_path_factory) -> Path:
    "A serving directory exported by `mlops-export` from the tiny trained model."
    out = tmp_path_factory.mktemp("serving") / "serving"
    proc = run_cli("mlops-export", tiny_model_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def workflow_job(
    workflow: str,  # the file name under .github/workflows, e.g. deploy.yml
    job: str,  # the job's key
) -> dict:
    "One job of a GitHub Actions workflow, as parsed from its YAML (`env`, `steps`, ...)."
    import yaml

    return yaml.safe_load((ROOT / ".github" / "workflows" / workflow).read_text())["jobs"][job]


def workflow_step(
    workflow: str,  # the file name under .github/workflows, e.g. deploy.yml
    job: str,  # the job's key
    name: str,  # the step's name or id
) -> str:
    "The `run:` script of one step of a GitHub Actions workflow, to run as the workflow would (see `run_workflow_step`)."
    found = [s for s in workflow_job(workflow, job)["steps"] if name in (s.get("name"), s.get("id"))]
    assert len(found) == 1 and "run" in found[0], f"{workflow}: job {job} has no single step {name!r} with a run script"
    return found[0]["run"]


def run_workflow_step(
    script: str,  # from `workflow_step`
    cwd: str | Path,  # the checkout the step runs in
    env: dict[str, str],  # over this process's environment: the job's env, GITHUB_SHA, GITHUB_OUTPUT, ...
    unset: tuple[str, ...] = (),  # variables to remove, as a job that does not set them
    timeout: float = 1800,  # seconds
) -> subprocess.CompletedProcess:
    "Run a step's script as GitHub Actions runs a `run:` step (`bash --noprofile --norc -eo pipefail`); output captured as text."
    setup_python = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` first, as actions/setup-python leaves it
    environment = {k: v for k, v in {**os.environ, **setup_python, **env}.items() if k not in unset}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def server(serving_dir, tmp_path_factory):
    "`mlops-serve` on a free port; yields (base URL, path of its stdout log)."
    log = tmp_path_factory.mktemp("server") / "stdout.log"
    with serve("--serving-dir", serving_dir, "--max-batch", "16", log=log) as url:
        yield url, log


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    "A moto server (AWS stand-in) on 127.0.0.1 and a free port; yields its URL, with dummy credentials in the environment."
    with _moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


@pytest.fixture(scope="session")
def image(serving_dir, tmp_path_factory):
    "The serving image built from a temporary context with the tiny model; the build secret is the host CA bundle plus a canary line."
    import uuid
    from types import SimpleNamespace

    from mlops_basics.devtools.containers import CA_BUNDLE, build_image, ensure_base_image, make_build_context, remove_image

    base = ensure_base_image()
    work = tmp_path_factory.mktemp("image")
    context = make_build_context(serving_dir, work / "context")
    canary = f"mlops-basics-build-secret-canary-{uuid.uuid4().hex}"
    secret = work / "ca_bundle.pem"
    secret.write_text(f"# {canary}\n{CA_BUNDLE.read_text()}")  # OpenSSL ignores text outside the PEM blocks
    tag = f"localhost/mlops-basics-test:{uuid.uuid4().hex[:12]}"
    try:
        _, log = build_image(context, tag, base=base, ca_bundle=secret)
        yield SimpleNamespace(tag=tag, log=log, canary=canary, secret=secret, work=work)
    finally:
        remove_image(tag)


@pytest.fixture(scope="session")
def release_build(tmp_path_factory) -> Path:
    "A clean copy of the checkout (tracked and new files; nothing git ignores) where the release workflow's build and check steps ran."
    import shutil

    copy = tmp_path_factory.mktemp("release") / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    env = {"RUNNER_TEMP": str(copy.parent)}
    for step in ("Build the sdist and the wheel", "Check them"):
        proc = run_workflow_step(workflow_step("release.yml", "build", step), copy, env, timeout=900)
        assert proc.returncode == 0, f"{step}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return copy
