"""`score/nightly` (nbs/15b_nightly_scoring.ipynb) from prefect.yaml, run by a Prefect process worker against a real Prefect
server on the tiny model: the day's files scored, the prediction distribution and a drift window written into the monitoring
data, and `mlops-monitor drift` reading that window. Prefect lives in .venv-prefect; the driver talks to it (as in test_orchestration.py)."""

import json
import os
import subprocess

import pytest
from test_orchestration import DRIVER, prefect_api  # noqa: F401  (a fixture: a real Prefect server)

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN, run_cli
from mlops_basics.ops.orchestration.workers import process_worker

pytestmark = pytest.mark.slow


def test_a_process_worker_runs_the_nightly_scoring(prefect_api, prefect_python, serving_dir, cola_raw, tmp_path):  # noqa: F811
    env = {**os.environ, **prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def drive(request: dict, timeout: float = 600):
        proc = subprocess.run([str(prefect_python), *DRIVER, json.dumps(request)], capture_output=True, text=True, timeout=timeout, env=env)
        assert proc.returncode == 0, f"{request}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    sentences = [line.split("\t")[3] for line in (cola_raw / "in_domain_dev.tsv").read_text().splitlines()]
    (incoming / "day.txt").write_text("\n".join(sentences) + "\n\n")  # and one empty line: a bad row
    drive({"pool": {"ensure": {"name": "mlops"}}})
    held = drive({"pool": {"apply": str(ROOT / "prefect.yaml")}})
    assert ("nightly", "mlops_basics.ops.batch.scoring_flow.nightly_score_flow") in [(d["name"], d["entrypoint"]) for d in held]
    parameters = {"input_dir": str(incoming), "output_dir": str(tmp_path / "scored"), "serving_dir": str(serving_dir),
                  "monitoring_dir": str(tmp_path / "monitoring"), "day": "2026-12-07"}  # fmt: skip
    run_id = drive({"pool": {"trigger": {"deployment": "score/nightly", "parameters": parameters}}})
    with process_worker(prefect_python, env, tmp_path / "worker.log"):
        done = drive({"pool": {"wait": {"flow_run_id": run_id, "timeout_s": 600}}}, timeout=700)
    assert done["state"] == "Completed", (done, (tmp_path / "worker.log").read_text()[-3000:])

    day = tmp_path / "monitoring" / "batch" / "2026-12-07"
    distribution = json.loads((day / "distribution.json").read_text())
    assert (distribution["rows"], distribution["scored"], distribution["bad"]) == (len(sentences) + 1, len(sentences), 1)
    assert sum(distribution["labels"].values()) == sum(distribution["p_acceptable_histogram"]) == len(sentences)
    assert len(list((tmp_path / "scored" / "2026-12-07").glob("part-*.parquet"))) == 1
    window = [json.loads(line) for line in (day / "window.jsonl").read_text().splitlines()]
    assert len(window) == len(sentences) and {r["label"] for r in window} <= {"acceptable", "unacceptable"}

    reference = tmp_path / "reference.jsonl"
    proc = run_cli("mlops-monitor", "reference", "--serving-dir", serving_dir, "--sample", 200, "--out", reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(
        "mlops-monitor",
        "drift",
        "--serving-dir",
        serving_dir,
        "--reference",
        reference,
        "--window",
        day / "window.jsonl",
        "--out",
        tmp_path / "drift",
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: drift found, an answer
    assert json.loads((tmp_path / "drift" / "drift_summary.json").read_text())["window"]["rows"] == len(sentences)
