"""Local stand-ins for the orchestration page (nbs/13_orchestration.ipynb), tests/test_orchestration.py and tests/test_deploy.py:
a DVC pipeline repository with a tiny model, a container registry, a Lambda function behind an alias with CloudWatch traffic,
the app's log after some traffic, a tool that fails once as a flaky network would, and an image build that needs no base image.
They run in .venv (pytest) and in .venv-prefect (the page): what they need of the course's tools comes from `tools` (.venv/bin)."""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

from mlops_basics.test_containers import podman
from mlops_basics.test_utils import free_port, http, process_stopped, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
TINY_PARAMS = ["model=tiny_random", "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.num_threads=1",
               "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
REGION = "eu-west-1"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}


def sh(*args, cwd, tools: str, env: dict | None = None) -> str:
    "Run a command with `tools` first on PATH; its stdout, or an AssertionError with its output."
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **GIT_ENV, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", **(env or {})})
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def tiny_pipeline_repo(dest: Path, # a new directory for the repository
                       tools: str, # the course's tools (.venv/bin)
                      ) -> Path:
    "A git + DVC repository with the course's pipeline and params for a tiny random model, a local remote beside it, committed."
    dest.mkdir(parents=True)
    for name in (".dvcignore", ".gitignore"): shutil.copy(ROOT/name, dest/name)
    # A tiny random model cannot meet a trained model's behavioural thresholds: its behaviour stage only measures.
    (dest/"dvc.yaml").write_text((ROOT/"dvc.yaml").read_text().replace("--out reports/behaviour.json", "--out reports/behaviour.json --no-thresholds"))
    shutil.copytree(ROOT/"mlops_basics", dest/"mlops_basics", ignore=shutil.ignore_patterns("__pycache__"))
    sh("git", "init", "-q", "-b", "main", cwd=dest, tools=tools)
    sh("dvc", "init", "-q", cwd=dest, tools=tools)
    sh("dvc", "config", "core.analytics", "false", cwd=dest, tools=tools)
    sh("dvc", "remote", "add", "-d", "local", dest.parent/f"{dest.name}-remote", cwd=dest, tools=tools)
    sh("mlops-pipeline", "params", *TINY_PARAMS, cwd=dest, tools=tools)
    sh("git", "add", "-A", cwd=dest, tools=tools); sh("git", "commit", "-qm", "pipeline", cwd=dest, tools=tools)
    return dest


def fail_once(directory: Path, # where the wrapper goes (put it first on the tools path)
              command: str, # the tool, e.g. dvc
              subcommand: str, # the subcommand that fails once, e.g. push
              tools: str, # where the real tool is
              message: str = "ERROR: unexpected error - Could not connect to the endpoint URL", # what the failure prints
             ) -> Path:
    "A wrapper of `command` whose first `subcommand` fails as a flaky network would; every other call runs the real tool."
    real = shutil.which(command, path=tools)
    assert real, f"{command} not found in {tools}"
    directory.mkdir(parents=True, exist_ok=True)
    wrapper, marker = directory/command, directory/f".{command}-{subcommand}-failed"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = "{subcommand}" ] && [ ! -e "{marker}" ]; then\n  touch "{marker}"; echo "{message}" >&2; exit 1\nfi\n'
                       f'exec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return directory


def podman_import_build(repo: Path, # the checkout, with artifacts/serving
                        tag: str, # the image to make
                       ) -> None:
    "An image holding the new serving directory, made with `podman import` (no base image, no network); a stand-in for the Dockerfile build."
    with tempfile.TemporaryDirectory() as tmp:
        layer = Path(tmp)/"layer.tar"
        with tarfile.open(layer, "w") as tar: tar.add(Path(repo)/"artifacts"/"serving", arcname="opt/mlops/serving")
        podman("import", "--change", "ENV MLOPS_SERVING_DIR=/opt/mlops/serving", layer, tag)


@contextlib.contextmanager
def registry_server(work: Path): # a directory for its storage and configuration
    "Debian's docker-registry on 127.0.0.1 with storage under `work`; yields host:port."
    port = free_port(); work.mkdir(parents=True, exist_ok=True)
    config = work/"config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {work/'data'}\n"
                      f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/", 30, process_stopped(proc))
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate(); proc.wait(timeout=30)


def registry_tags(registry: str, repository: str = "mlops-basics") -> list[str]:
    "The tags the registry holds for `repository` (none when it was never pushed)."
    status, _, body = http("GET", f"http://{registry}/v2/{repository}/tags/list")
    return sorted(json.loads(body).get("tags") or []) if status == 200 else []


def lambda_function(endpoint: str, # the moto server
                    name: str, # the function's name
                   ) -> str:
    "An image function on the moto server with version 1 published and the alias `live` on it; returns '1'."
    import boto3
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION)
    role = iam.create_role(RoleName=f"{name}-{uuid.uuid4().hex[:6]}", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
    lam = boto3.client("lambda", endpoint_url=endpoint, region_name=REGION)
    lam.create_function(FunctionName=name, PackageType="Image", Role=role, Code={"ImageUri": f"123456789012.dkr.ecr.{REGION}.amazonaws.com/mlops-basics@sha256:{'0' * 64}"})
    version = lam.publish_version(FunctionName=name, Description="model v1")["Version"]
    lam.create_alias(FunctionName=name, Name="live", FunctionVersion=version)
    return version


def alias_state(endpoint: str, name: str) -> tuple[str, dict]:
    "The version the alias `live` points at, and its extra routing weights."
    import boto3
    alias = boto3.client("lambda", endpoint_url=endpoint, region_name=REGION).get_alias(FunctionName=name, Name="live")
    return alias["FunctionVersion"], (alias.get("RoutingConfig") or {}).get("AdditionalVersionWeights") or {}


def lambda_traffic(endpoint: str, # the moto server
                   name: str, # the function
                   traffic: dict[str, tuple[int, int]], # version -> (invocations, errors) of the last minutes
                  ) -> None:
    "Write CloudWatch's per-version Invocations and Errors of the alias `live`, as Lambda would after that traffic."
    import boto3
    cloudwatch = boto3.client("cloudwatch", endpoint_url=endpoint, region_name=REGION)
    now = dt.datetime.now(dt.timezone.utc)
    for version, (invocations, errors) in traffic.items():
        dims = [{"Name": "FunctionName", "Value": name}, {"Name": "Resource", "Value": f"{name}:live"}, {"Name": "ExecutedVersion", "Value": version}]
        cloudwatch.put_metric_data(Namespace="AWS/Lambda", MetricData=[
            {"MetricName": "Invocations", "Dimensions": dims, "Value": invocations, "Unit": "Count", "Timestamp": now},
            {"MetricName": "Errors", "Dimensions": dims, "Value": errors, "Unit": "Count", "Timestamp": now}])


def traffic_log(serving_dir: Path, # the model to serve
                sentences: list[str], # what users send, one request each
                log: Path, # where the app's stdout goes
                tools: str, # where mlops-serve is (.venv/bin)
               ) -> Path:
    "The JSON log of a real `mlops-serve --log-text` after `sentences`, one request each."
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(tools)/"mlops-serve"), "--serving-dir", str(serving_dir), "--port", str(port), "--log-text"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "MLOPS_THREADS": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/health", 120, process_stopped(proc, log))
            for i, sentence in enumerate(sentences):
                status, _, body = http("POST", f"{url}/predict", json.dumps({"sentences": [sentence]}).encode(),
                                       {"Content-Type": "application/json", "X-Request-ID": f"req-{i}"})
                assert status == 200, body
        finally:
            proc.terminate(); proc.wait(timeout=30)
    return log
