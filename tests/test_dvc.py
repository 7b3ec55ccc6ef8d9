"""The DVC pipeline for real: repro, no-op repro, each stage's code dependencies, params that re-run only what depends on them,
the retrain gate, experiments, and push/pull through a local remote and an S3 remote (a moto server), byte for byte."""

import configparser
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, workflow_step
from mlops_basics.devtools.test_utils import BIN, http

pytestmark = pytest.mark.slow

TINY = [
    "model=tiny_random",
    "logger=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.num_threads=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
OUTPUTS = ("data/cola", "artifacts/model", "artifacts/serving")
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def sh(*args, cwd, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    "Run a command with the venv's tools first on PATH."
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})},
    )
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def tree_digest(repo: Path) -> dict[str, str]:
    "sha256 of every file of the pipeline's outputs."
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for out in OUTPUTS
        for p in sorted((repo / out).rglob("*"))
        if p.is_file()
    }


# Put on PYTHONPATH for the first `dvc repro`: every process that imported mlops_basics writes down, at exit, its command line
# and the mlops_basics modules it loaded, so the test can compare them with the stages' dependencies.
RECORD_IMPORTS = """import atexit, json, os, sys

def _record():
    modules = sorted(m for m in sys.modules if m.startswith("mlops_basics."))
    if modules:
        with open(os.path.join(os.environ["MLOPS_RECORD_IMPORTS"], f"{os.getpid()}.json"), "w") as f:
            json.dump({"argv": sys.argv, "modules": modules}, f)

if os.environ.get("MLOPS_RECORD_IMPORTS"): atexit.register(_record)
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    "A git + DVC repository with this project's pipeline (tiny params), reproduced once (recording each stage's imports in ../imports)."
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    for name in (".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, repo / name)
    # The tiny model cannot meet the behavioural thresholds of a trained one: its behaviour stage only measures.
    pipeline = (ROOT / "dvc.yaml").read_text()
    assert "mlops-behaviour --serving-dir artifacts/serving --out reports/behaviour.json" in pipeline
    (repo / "dvc.yaml").write_text(pipeline.replace("--out reports/behaviour.json", "--out reports/behaviour.json --no-thresholds"))
    shutil.copytree(ROOT / "mlops_basics", repo / "mlops_basics", ignore=shutil.ignore_patterns("__pycache__"))
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("dvc", "config", "core.analytics", "false", cwd=repo)
    sh("dvc", "remote", "add", "-d", "local", repo.parent / "remote", cwd=repo)
    sh("mlops-pipeline", "params", *TINY, cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "pipeline", cwd=repo)
    hook, records = repo.parent / "hook", repo.parent / "imports"
    hook.mkdir()
    records.mkdir()
    (hook / "sitecustomize.py").write_text(RECORD_IMPORTS)
    python_path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    sh("dvc", "repro", cwd=repo, env={"PYTHONPATH": python_path, "MLOPS_RECORD_IMPORTS": str(records)})
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "first run", cwd=repo)
    return repo


def test_repro_runs_every_stage(repo):
    lock = (repo / "dvc.lock").read_text()
    for stage in ("data", "train", "export", "evaluate", "behaviour", "card"):
        assert f"  {stage}:" in lock
    assert sorted(p.name for p in (repo / "data" / "cola").iterdir()) == [
        "in_domain_dev.tsv",
        "in_domain_train.tsv",
        "out_of_domain_dev.tsv",
        "provenance.json",
    ]
    assert {"model.onnx", "model.int8.onnx", "tokenizer.json", "metadata.json"} <= {p.name for p in (repo / "artifacts" / "serving").iterdir()}
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert metrics["sentences"] == 1043 and -1 <= metrics["mcc"] <= 1
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=repo).stdout)
    assert shown[""]["data"]["reports/metrics.json"]["data"]["mcc"] == metrics["mcc"]  # DVC reads the metrics file declared in dvc.yaml
    plots = sh("dvc", "plots", "show", "--json", cwd=repo).stdout
    for name in ("confusion.csv", "precision_recall.csv", "roc.csv", "epochs.csv"):
        assert name in plots


def test_second_repro_does_nothing(repo):
    before = (repo / "dvc.lock").read_text(), tree_digest(repo)
    out = sh("dvc", "repro", cwd=repo).stdout
    assert "Data and pipelines are up to date." in out
    assert "Running stage" not in out
    assert ((repo / "dvc.lock").read_text(), tree_digest(repo)) == before


def test_each_stage_depends_on_the_code_it_runs(repo):
    "dvc.yaml lists, for every stage, exactly the mlops_basics modules its command imported in the first repro."
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    runs = [json.loads(p.read_text()) for p in (repo.parent / "imports").glob("*.json")]
    wrong = {}
    for name, stage in stages.items():
        command = stage["cmd"].split()
        ran = [r for r in runs if Path(r["argv"][0]).name == command[0] and r["argv"][1:] == command[1:]]
        assert len(ran) == 1, (name, [r["argv"] for r in runs])
        # a module's file; the layers' packages (mlops_basics.core, ...) hold no code of their own
        imported = {"/".join(m.split(".")) + ".py" for m in ran[0]["modules"] if not (ROOT / Path(*m.split("."))).is_dir()}
        declared = {d for d in stage["deps"] if d.startswith("mlops_basics/")}
        if declared != imported:
            wrong[name] = f"dvc.yaml lists {sorted(declared)}, its command imported {sorted(imported)}"
    assert not wrong, "\n".join(f"stage {name}: {why}" for name, why in wrong.items())


def test_retrain_gate_passes_a_tie_and_stops_a_drop(repo, tmp_path):
    "The gate step of the retrain workflow, run as written: main's MCC exactly opens the pull request, a lower MCC does not."
    script = workflow_step("retrain.yml", "retrain", "gate")  # its tools by name: `sh` puts the venv first on PATH, as the Install step does

    def gate() -> str:
        "Run the step as GitHub Actions would; return what it wrote to $GITHUB_OUTPUT."
        output = tmp_path / "github_output"
        output.write_text("")
        sh("bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script, cwd=repo, env={"GITHUB_OUTPUT": str(output)})
        return output.read_text()

    metrics_file = repo / "reports" / "metrics.json"
    try:
        assert gate() == "open_pr=true\n"  # the workspace is main's commit: the same MCC, which is no drop
        metrics = json.loads(metrics_file.read_text())
        metrics["mcc"] -= 0.1
        metrics_file.write_text(json.dumps(metrics))
        assert gate() == ""
    finally:
        sh("git", "checkout", "--", "reports/metrics.json", cwd=repo)
        (repo / "metrics-diff.json").unlink(missing_ok=True)


def test_a_param_reruns_only_what_depends_on_it(repo):
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 3.0e-05", "learning_rate: 0.0002"))
    status = json.loads(sh("dvc", "status", "--json", cwd=repo).stdout)
    assert "train" in status and "data" not in status
    out = sh("dvc", "repro", cwd=repo).stdout
    assert "Stage 'data' didn't change, skipping" in out
    for stage in ("train", "export", "evaluate", "behaviour"):
        assert f"Running stage '{stage}'" in out
    assert "learning_rate: 0.0002" in (repo / "dvc.lock").read_text()
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "higher learning rate", cwd=repo)


def test_experiments_run_and_compare(repo):
    sh("dvc", "exp", "run", "-S", "training.learning_rate=0.0003", "-n", "lr-3e-4", cwd=repo)
    rows = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    text = json.dumps(rows)
    assert "lr-3e-4" in text and "0.0003" in text and "mcc" in text
    sh("git", "checkout", "--", ".", cwd=repo)
    sh("dvc", "checkout", "-q", cwd=repo)  # back to the committed state


def _wipe(repo: Path):
    "Delete the DVC cache and every pipeline output: only git and the remote are left."
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    for out in OUTPUTS:
        shutil.rmtree(repo / out, ignore_errors=True)


def test_push_and_pull_through_the_local_remote(repo):
    expected = tree_digest(repo)
    sh("dvc", "push", cwd=repo)
    assert (repo.parent / "remote").is_dir()  # created by the first push
    _wipe(repo)
    sh("dvc", "pull", cwd=repo)
    assert tree_digest(repo) == expected


@contextlib.contextmanager
def checking_credentials(moto_url: str):
    "Make the moto server check credentials, as S3 does, until the block ends."

    def reset_auth(count: str) -> dict:  # the number of requests moto lets through before it checks ("inf": never)
        status, _, body = http("POST", f"{moto_url}/moto-api/reset-auth", count.encode(), {"Content-Type": "text/plain"})
        assert status == 200, body
        return json.loads(body)

    previous = reset_auth("0")["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield
    finally:
        reset_auth(previous)


AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def committed_s3_remote() -> str:
    "The URL of the `s3` remote in this repository's .dvc/config."
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    return config['\'remote "s3"\'']["url"]


def test_push_and_pull_through_s3(repo, moto_server):
    "The project's `s3` remote as configured, with the endpoint and credentials taken from the environment (here: moto)."
    url = committed_s3_remote()
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    env = {**AWS, "AWS_ENDPOINT_URL": moto_server}
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=bucket)
    sh("dvc", "remote", "add", "-f", "s3", url, cwd=repo)
    expected = tree_digest(repo)
    sh("dvc", "push", "-r", "s3", cwd=repo, env=env)
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] > 10
    _wipe(repo)
    sh("dvc", "pull", "-r", "s3", cwd=repo, env=env)
    assert tree_digest(repo) == expected


def test_failed_pulls_are_clear_and_leave_the_workspace_alone(repo, moto_server):
    before = tree_digest(repo)
    missing = sh("dvc", "pull", "-r", "nowhere", cwd=repo, check=False)
    assert missing.returncode != 0 and "nowhere" in (missing.stderr + missing.stdout)
    sh("dvc", "remote", "add", "-f", "s3", "s3://no-such-bucket/dvc", cwd=repo)
    sh("dvc", "remote", "modify", "--local", "s3", "endpointurl", moto_server, cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache", ignore_errors=True)
    shutil.rmtree(repo / "artifacts" / "serving")
    failed = sh("dvc", "pull", "-r", "s3", cwd=repo, env=AWS, check=False)
    assert failed.returncode != 0
    assert "no-such-bucket" in failed.stderr + failed.stdout or "NoSuchBucket" in failed.stderr + failed.stdout
    assert not (repo / "artifacts" / "serving").exists()  # nothing half-written
    assert {k: v for k, v in tree_digest(repo).items() if not k.startswith("artifacts/serving")} == {
        k: v for k, v in before.items() if not k.startswith("artifacts/serving")
    }
    sh("dvc", "pull", cwd=repo)  # the local remote still has everything
    assert tree_digest(repo) == before


def test_bad_credentials_are_reported_and_harmless(repo, moto_server):
    "A moto server that checks credentials (as S3 does) refuses ours: DVC says so, and the workspace is untouched."
    with checking_credentials(moto_server):
        sh("dvc", "remote", "add", "-f", "s3", "s3://mlops-basics-test/dvc", cwd=repo)
        sh("dvc", "remote", "modify", "--local", "s3", "endpointurl", moto_server, cwd=repo)
        before = tree_digest(repo)
        pushed = sh("dvc", "push", "-r", "s3", cwd=repo, env={**AWS, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1"}, check=False)
        assert pushed.returncode != 0
        assert "InvalidAccessKeyId" in pushed.stderr + pushed.stdout or "403" in pushed.stderr + pushed.stdout, pushed.stderr[-2000:]
        pulled = sh("dvc", "pull", "-r", "s3", "--force", cwd=repo, env={**AWS, "AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1"}, check=False)
        assert pulled.returncode != 0
        assert tree_digest(repo) == before
