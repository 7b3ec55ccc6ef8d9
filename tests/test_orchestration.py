"""The Prefect flows of nbs/13_orchestration.ipynb end to end against a real Prefect API (`prefect server start` on 127.0.0.1,
SQLite): retrain on the course's DVC pipeline with a tiny model, a local DVC remote, moto (ECR, Lambda, CloudWatch) and a local
registry; a push that fails once as a flaky network would and is retried; an unchanged model that is not released again; a failed
quality gate that stops before any push or release; an unhealthy canary rolled back; drift that starts the retrain deployment of
prefect.yaml; falling labelled agreement that starts it. The whole loop with a real Prometheus firing the agreement alert runs in
nbs/14c_closing_the_loop.ipynb's slow cells (tests/test_notebooks.py), so it is not run twice. Prefect's pins clash with .venv's, so the flows run in
.venv-prefect (mlops_basics.devtools.orchestration_driver) and these tests read what the API recorded."""

import json
import os
import re
import subprocess
import uuid

import boto3
import pytest

from conftest import ROOT
from mlops_basics.devtools.containers import containers_conf
from mlops_basics.devtools.rehearsal import (
    AWS_ENV,
    REGION,
    alias_state,
    fail_once,
    lambda_function,
    lambda_traffic,
    registry_server,
    registry_tags,
    tiny_pipeline_repo,
    traffic_log,
)
from mlops_basics.devtools.test_utils import BIN, free_port, local_postgres
from mlops_basics.ops.models.registry import CHAMPION, MODEL_NAME, registry_client, registry_server as mlflow_server
from mlops_basics.ops.orchestration.workers import process_worker, stop_worker

pytestmark = pytest.mark.slow
DRIVER = ["-m", "mlops_basics.devtools.orchestration_driver"]  # run with .venv-prefect's Python
FUNCTION = f"mlops-basics-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def prefect_api(prefect_python, tmp_path_factory):
    "A real Prefect server (its own SQLite under a temporary PREFECT_HOME); yields the environment that points flows at it."
    home = tmp_path_factory.mktemp("prefect")
    server = subprocess.Popen(
        [str(prefect_python), *DRIVER, json.dumps({"serve": str(home)})], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        url = json.loads(server.stdout.readline() or "null")
        assert url, f"the Prefect server did not start: {(home / 'server.log').read_text()[-3000:] if (home / 'server.log').exists() else ''}"
        yield {"PREFECT_API_URL": url, "PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "storage")}
    finally:
        server.stdin.close()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def world(prefect_api, prefect_python, moto_server, tmp_path_factory):
    "The rehearsal: a tiny pipeline repository, a registry, a Lambda function with version 1 live, and how to run the driver."
    work = tmp_path_factory.mktemp("orchestration")
    repo = tiny_pipeline_repo(work / "repo", str(BIN))
    env = {**AWS_ENV, **prefect_api, "AWS_ENDPOINT_URL": moto_server, "MLOPS_LAMBDA_FUNCTION": FUNCTION, "CONTAINERS_CONF": str(containers_conf())}
    lambda_function(moto_server, FUNCTION)

    def drive(request: dict, timeout: float = 600):
        proc = subprocess.run(
            [str(prefect_python), *DRIVER, json.dumps(request)], capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
        )
        assert proc.returncode == 0, f"{request}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with registry_server(work / "registry") as registry:
        rehearsal = dict(
            repo=str(repo),
            remote="local",
            image="localhost/mlops-basics-orchestration",
            build="podman-import",
            registry=registry,
            insecure_registry=True,
            canary_pause_s=0,
            retry_delay_s=0,
            tools=str(BIN),
        )
        yield {"repo": repo, "work": work, "registry": registry, "moto": moto_server, "drive": drive, "rehearsal": rehearsal, "env": env}


@pytest.fixture(scope="module")
def model_registry(mlflow_server_bin, tmp_path_factory):
    "The model registry (the registry page): MLflow's server on PostgreSQL, where the retrain flow registers its model and moves the aliases."
    work = tmp_path_factory.mktemp("model-registry")
    with local_postgres("mlflow") as database, mlflow_server(database, work / "files", free_port(), work / "server.log", mlflow_server_bin) as url:
        yield url


def tasks_of(history: list, flow_run_id: str) -> dict:
    "The task runs of one flow run, by task name."
    run = next(r for r in history if r["id"] == flow_run_id)
    return {t["task"]: t for t in run["tasks"]}


def test_retrain_end_to_end_retries_a_transient_fault(world, model_registry):
    "The whole flow on the tiny model: the first `dvc push` fails as a flaky network would, is retried, the canary is promoted, and so is its registered version."
    flaky = fail_once(world["work"] / "flaky", "dvc", "push", str(BIN))
    lambda_traffic(world["moto"], FUNCTION, {"2": (300, 1), "1": (2700, 8)})  # CloudWatch: version 2 (the canary) is healthy
    parameters = {**world["rehearsal"], "behaviour_thresholds": {}, "tools": f"{flaky}{os.pathsep}{BIN}", "model_registry": model_registry}
    ran = world["drive"]({"run": "retrain", "parameters": parameters})
    assert ran["state"] == "Completed", ran["message"]
    result = ran["result"]
    champion = registry_client(model_registry).get_model_version_by_alias(MODEL_NAME, CHAMPION)
    assert champion.tags["model_version"] == result["model_version"]  # registered, made challenger, then champion with the canary
    assert result["stages"] == ["data", "train", "export", "evaluate", "behaviour", "card"]
    assert result["release"] == {"version": "2", "outcome": "promoted", "alias": {"stable": "2", "canary": None, "weight": 0.0}}
    assert alias_state(world["moto"], FUNCTION) == ("2", {})
    assert registry_tags(world["registry"]) == [result["model_version"]]
    assert (
        result["image_uri"].split("@")[1]
        in boto3.client("lambda", endpoint_url=world["moto"], region_name=REGION).get_function(FunctionName=FUNCTION, Qualifier="2")["Code"][
            "ImageUri"
        ]
    )
    assert any((world["work"] / "repo-remote").rglob("*")), "dvc push wrote nothing to the local remote"

    tasks = tasks_of(world["drive"]({"history": ["retrain"]}), ran["flow_run_id"])
    assert list(tasks) == ["fetch data", "dvc repro", "quality gate", "dvc push", "build image", "push image", "model registry", "canary release"]
    assert {name: (t["state"], t["run_count"]) for name, t in tasks.items()} == {
        "fetch data": ("Completed", 1),
        "dvc repro": ("Completed", 1),
        "quality gate": ("Completed", 1),
        "dvc push": ("Completed", 2),
        "build image": ("Completed", 1),
        "push image": ("Completed", 1),
        "model registry": ("Completed", 1),
        "canary release": ("Completed", 1),
    }


def versions(world) -> list[str]:
    "The published versions of the function."
    lam = boto3.client("lambda", endpoint_url=world["moto"], region_name=REGION)
    return [v["Version"] for v in lam.list_versions_by_function(FunctionName=FUNCTION)["Versions"]]


def test_a_retrain_that_changes_nothing_releases_nothing(world):
    "The same data and params: no stage runs, the gate passes on a tie, and the model that serves already is not released again."
    ran = world["drive"]({"run": "retrain", "parameters": {**world["rehearsal"], "behaviour_thresholds": {}}})
    assert ran["state"] == "Completed", ran["message"]
    assert ran["result"]["stages"] == [] and ran["result"]["gate"].startswith("reports/metrics.json: mcc")
    assert ran["result"]["release"] == {"version": "2", "outcome": "already live", "alias": {"stable": "2", "canary": None, "weight": 0.0}}
    assert alias_state(world["moto"], FUNCTION) == ("2", {}) and versions(world) == ["$LATEST", "1", "2"]


def test_a_failed_quality_gate_stops_before_the_release(world):
    "Held to Week 11's thresholds, which a tiny random model cannot meet: the gate fails, nothing is pushed, the alias stays."
    repo = world["repo"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "release"], cwd=repo, check=True)
    before = (
        alias_state(world["moto"], FUNCTION),
        registry_tags(world["registry"]),
        versions(world),
        sorted(str(p) for p in (world["work"] / "repo-remote").rglob("*")),
    )
    ran = world["drive"]({"run": "retrain", "parameters": world["rehearsal"]})
    assert ran["state"] == "Failed" and "QualityGateFailed" in ran["message"] and "mft_acceptable pass rate" in ran["message"], ran["message"]
    tasks = tasks_of(world["drive"]({"history": ["retrain"]}), ran["flow_run_id"])
    assert {name: (t["state"], t["run_count"]) for name, t in tasks.items()} == {
        "fetch data": ("Completed", 1),
        "dvc repro": ("Completed", 1),
        "quality gate": ("Failed", 1),
    }  # a real failure is not retried
    after = (
        alias_state(world["moto"], FUNCTION),
        registry_tags(world["registry"]),
        versions(world),
        sorted(str(p) for p in (world["work"] / "repo-remote").rglob("*")),
    )
    assert after == before


def test_an_unhealthy_canary_is_rolled_back(world):
    "Another learning rate gives another model; CloudWatch shows its canary failing 10% of requests: the alias goes back to version 2."
    params = world["repo"] / "params.yaml"
    params.write_text(re.sub(r"learning_rate: \S+", "learning_rate: 0.0002", params.read_text()))
    assert "learning_rate: 0.0002" in params.read_text()
    lambda_traffic(world["moto"], FUNCTION, {"3": (300, 30), "2": (2700, 5)})
    # The MCC gate is not what this test is about: a tiny random model's MCC moves by chance with the learning rate.
    ran = world["drive"]({"run": "retrain", "parameters": {**world["rehearsal"], "behaviour_thresholds": {}, "mcc_tolerance": 2.0}})
    assert ran["state"] == "Failed" and "ReleaseRolledBack: version 3 rolled back to 2" in ran["message"], ran["message"]
    assert "error rate 10.00% over 300 requests is above 2.00%" in ran["message"]
    assert alias_state(world["moto"], FUNCTION) == ("2", {}) and versions(world) == ["$LATEST", "1", "2", "3"]
    assert len(registry_tags(world["registry"])) == 2  # the new image was pushed: it is the release that failed
    tasks = tasks_of(world["drive"]({"history": ["retrain"]}), ran["flow_run_id"])
    assert tasks["dvc repro"]["state"] == "Completed" and (tasks["canary release"]["state"], tasks["canary release"]["run_count"]) == ("Failed", 1)


def test_prefect_yaml_deployments_register_with_their_schedules(world):
    held = world["drive"]({"apply": str(ROOT / "prefect.yaml")})
    assert [(d["name"], d["crons"], d["timezones"]) for d in held] == [
        ("weekly", ["0 4 * * 1"], ["UTC"]),
        ("hourly", ["15 * * * *"], ["UTC"]),
        ("nightly", ["30 2 * * *"], ["UTC"]),
    ]
    assert [d["entrypoint"].rsplit(":", 1)[1] for d in held] == ["retrain_flow", "monitor_flow", "nightly_score_flow"]
    assert held[1]["parameters"]["retrain_deployment"] == "retrain/weekly"
    import yaml

    retrain_cron = yaml.safe_load((ROOT / ".github" / "workflows" / "retrain.yml").read_text())[True]["schedule"][0]["cron"]  # YAML 1.1: on is True
    assert held[0]["crons"] == [retrain_cron]


def test_drift_starts_the_retrain_deployment_once(world):
    "Shifted traffic fails the drift report, and the monitor starts retrain/weekly; a second run on the same log is served from the cache."
    import numpy as np

    from mlops_basics.core.data import load_cola
    from mlops_basics.ops.monitoring.drift import corrupt

    rng = np.random.default_rng(0)
    serving_dir = world["repo"] / "artifacts" / "serving"
    log = traffic_log(serving_dir, [corrupt(e.sentence, rng) for e in load_cola().validation[:120]], world["work"] / "app.log", str(BIN))
    watch = {
        "logs": str(log),
        "serving_dir": str(serving_dir),
        "work_dir": str(world["work"] / "monitor"),
        "reference_sample": 300,
        "tools": str(BIN),
        "retry_delay_s": 0,
        "retrain_parameters": world["rehearsal"],
    }
    first = world["drive"]({"run": "monitor", "parameters": watch})
    assert first["state"] == "Completed", first["message"]
    assert "input.oov" in first["result"]["failed"] and first["result"]["shipped"]["predictions"] == 120
    triggered = first["result"]["retrain_flow_run"]
    second = world["drive"]({"run": "monitor", "parameters": watch})
    assert second["result"]["retrain_flow_run"] == triggered  # the same evidence starts one retrain

    history = world["drive"]({"history": ["retrain", "monitor"]})
    retrain = next(r for r in history if r["id"] == triggered)
    assert (retrain["flow"], retrain["state"], retrain["deployment_id"] is not None) == ("retrain", "Scheduled", True)
    assert "drift" in retrain["tags"] and retrain["parameters"]["repo"] == str(world["repo"])
    assert sum(1 for r in history if r["flow"] == "retrain" and r["deployment_id"]) == 1
    assert {n: t["state"] for n, t in tasks_of(history, first["flow_run_id"]).items()} == {
        "ship logs": "Completed",
        "reference profile": "Completed",
        "drift report": "Completed",
    }
    assert {n: t["state"] for n, t in tasks_of(history, second["flow_run_id"]).items()} == {
        "ship logs": "Completed",
        "reference profile": "Cached",
        "drift report": "Cached",
    }


@pytest.fixture(scope="module")
def pool(world):
    "The process work pool `mlops` and prefect.yaml's deployments registered for it; yields what the API holds."
    assert world["drive"]({"pool": {"ensure": {"name": "mlops"}}}) == {"name": "mlops", "type": "process", "concurrency_limit": None}
    held = world["drive"]({"pool": {"apply": str(ROOT / "prefect.yaml")}})
    assert [(d["name"], d["work_pool"], d["concurrency_limit"]) for d in held] == [
        ("weekly", "mlops", 1),
        ("hourly", "mlops", None),
        ("nightly", "mlops", None),
    ]
    assert held[0]["entrypoint"] == "mlops_basics.ops.orchestration.flows.retrain_flow"
    return held


def worker_env(world) -> dict:
    "The worker's environment: the Prefect API, AWS (moto), the course's tools first on PATH."
    return {**os.environ, **world["env"], "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def test_a_process_worker_runs_the_retrain_that_drift_starts(world, pool, prefect_python):
    "Drift in new traffic starts retrain/weekly; a process worker executes it end to end on the tiny model and the live alias moves."
    import numpy as np

    from mlops_basics.core.data import load_cola
    from mlops_basics.ops.monitoring.drift import corrupt

    rng = np.random.default_rng(1)
    serving_dir = world["repo"] / "artifacts" / "serving"
    log = traffic_log(serving_dir, [corrupt(e.sentence, rng) for e in load_cola().validation[200:320]], world["work"] / "app-2.log", str(BIN))

    params = world["repo"] / "params.yaml"  # another learning rate: a new model, so the pipeline trains and the release publishes
    params.write_text(re.sub(r"learning_rate: \S+", "learning_rate: 0.0001", params.read_text()))
    parameters = {**world["rehearsal"], "behaviour_thresholds": {}, "mcc_tolerance": 2.0}  # the tiny model's MCC moves by chance
    lambda_traffic(world["moto"], FUNCTION, {"3": (300, 1), "4": (300, 1), "2": (2700, 8)})  # whichever version the release publishes is healthy
    watch = {
        "logs": str(log),
        "serving_dir": str(serving_dir),
        "work_dir": str(world["work"] / "monitor-2"),
        "reference_sample": 300,
        "tools": str(BIN),
        "retry_delay_s": 0,
        "retrain_parameters": parameters,
    }
    monitored = world["drive"]({"run": "monitor", "parameters": watch})
    assert monitored["state"] == "Completed" and monitored["result"]["failed"], monitored
    run_id = monitored["result"]["retrain_flow_run"]
    assert world["drive"]({"pool": {"wait": {"flow_run_id": run_id, "timeout_s": 0}}})["state"] == "Scheduled"  # no worker yet
    with process_worker(prefect_python, worker_env(world), world["work"] / "worker-1.log"):
        done = world["drive"]({"pool": {"wait": {"flow_run_id": run_id, "timeout_s": 1200}}}, timeout=1300)
    assert done["state"] == "Completed", (done, (world["work"] / "worker-1.log").read_text()[-3000:])
    tasks = tasks_of(world["drive"]({"history": ["retrain"]}), run_id)
    assert list(tasks)[:3] == ["fetch data", "dvc repro", "quality gate"] and tasks["canary release"]["state"] == "Completed"
    live, routing = alias_state(world["moto"], FUNCTION)
    assert live == versions(world)[-1] and live not in ("1", "2") and routing == {}  # the new version promoted


def test_one_retrain_at_a_time_and_a_killed_worker_leaves_a_crashed_run(world, pool, prefect_python):
    "A second run of retrain/weekly waits for the slot of the first (its concurrency limit); a worker stopped mid-run leaves that run Crashed with its logs; a new worker runs the next."
    slow = world["work"] / "slow-pull"
    slow.mkdir(exist_ok=True)  # the first run stays in `dvc pull` until the worker is stopped
    (slow / "dvc").write_text(f'#!/bin/sh\nif [ "$1" = pull ]; then sleep 600; fi\nexec "{BIN}/dvc" "$@"\n')
    (slow / "dvc").chmod(0o755)
    parameters = {**world["rehearsal"], "behaviour_thresholds": {}, "mcc_tolerance": 2.0}
    first = world["drive"](
        {
            "pool": {
                "trigger": {
                    "deployment": "retrain/weekly",
                    "idempotency_key": "slow-1",
                    "parameters": {**parameters, "tools": f"{slow}{os.pathsep}{BIN}"},
                }
            }
        }
    )
    with process_worker(prefect_python, worker_env(world), world["work"] / "worker-2.log") as worker:
        running = world["drive"]({"pool": {"wait": {"flow_run_id": first, "until": ["Running"], "timeout_s": 300, "poll_s": 0.5}}})
        assert running["state"] == "Running", running
        second = world["drive"]({"pool": {"trigger": {"deployment": "retrain/weekly", "parameters": parameters, "idempotency_key": "next-2"}}})
        held = world["drive"](
            {"pool": {"wait": {"flow_run_id": second, "until": ["AwaitingConcurrencySlot", "Running"], "timeout_s": 300, "poll_s": 0.5}}}
        )
        assert held["state"] == "AwaitingConcurrencySlot", held  # the worker took it, the API kept it waiting: the slot is the first run's
        stop_worker(worker)
    crashed = world["drive"]({"pool": {"wait": {"flow_run_id": first, "timeout_s": 120}}})
    assert crashed["state"] == "Crashed" and crashed["logs"] > 0, crashed
    with process_worker(prefect_python, worker_env(world), world["work"] / "worker-3.log"):
        done = world["drive"]({"pool": {"wait": {"flow_run_id": second, "timeout_s": 1200}}}, timeout=1300)
    assert done["state"] == "Completed", (done, (world["work"] / "worker-3.log").read_text()[-3000:])
    assert done["start"] >= crashed["end"]  # it ran once the first had ended


def test_falling_labelled_agreement_starts_the_retrain(world, pool, tmp_path, monkeypatch):
    "In-domain traffic whose users contradict every answer: the monitor joins their labels, finds agreement below the bound, and starts retrain/weekly."
    from mlops_basics.core.data import LABELS, load_cola
    from mlops_basics.devtools.test_utils import http, serve

    monkeypatch.setenv("MLOPS_FEEDBACK_BURST", "1000")
    serving_dir, log, headers = world["repo"] / "artifacts" / "serving", tmp_path / "app.log", {"Content-Type": "application/json"}
    with serve("--serving-dir", serving_dir, log=log) as url:
        examples = load_cola().validation[:120]
        for start in range(0, len(examples), 4):
            answer = json.loads(
                http("POST", f"{url}/predict", json.dumps({"sentences": [e.sentence for e in examples[start : start + 4]]}).encode(), headers)[2]
            )
            for i, p in enumerate(answer["predictions"]):
                body = {"request_id": answer["request_id"], "index": i, "label": LABELS[1 - p["label_id"]]}
                assert http("POST", f"{url}/feedback", json.dumps(body).encode(), headers)[0] == 202
    watch = {
        "logs": str(log),
        "serving_dir": str(serving_dir),
        "work_dir": str(tmp_path / "monitor"),
        "reference_sample": 300,
        "tools": str(BIN),
        "retry_delay_s": 0,
        "retrain_parameters": world["rehearsal"],
    }
    ran = world["drive"]({"run": "monitor", "parameters": watch})
    assert ran["state"] == "Completed", ran["message"]
    assert ran["result"]["shipped"]["labelled"] == 120 and ran["result"]["agreement_falling"] is True
    evaluation = json.loads((tmp_path / "monitor" / "evaluation.json").read_text())
    assert evaluation["latest"]["accuracy"] == 0.0 and evaluation["agreement_falling"]
    concept = json.loads((tmp_path / "monitor" / "drift" / "drift_summary.json").read_text())["checks"]["concept.mcc"]
    assert concept["matched"] == 120  # the drift report's concept check read the joined labels
    triggered = ran["result"]["retrain_flow_run"]
    state = world["drive"]({"pool": {"wait": {"flow_run_id": triggered, "timeout_s": 0}}})
    assert triggered and state["state"] in ("Scheduled", "Late"), state
