"""The monitoring side: the shipper reads the app's real log lines from a file, stdin and CloudWatch Logs (a moto server),
indexes them with the _bulk API (a local server that records the requests and answers like Elasticsearch), and the
drift checks pass on in-domain traffic and fail on shifted traffic. Elasticsearch and Kibana themselves cannot run here."""

import base64
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN, free_port, http, process_stopped, run_cli, wait_for_http

SENTENCES = [
    "The cat sat on the mat.",
    "Mat the on sat cat.",
    "She has finished her homework.",
    "Who do you think left?",
    "The book was written by John.",
    "Colorless green ideas sleep furiously.",
]


@pytest.fixture(scope="module")
def app_log(serving_dir, tmp_path_factory) -> Path:
    "The stdout of a real `mlops-serve --log-text` after known traffic: predictions, a 422, a health check."
    out_dir = tmp_path_factory.mktemp("app-log")
    port, log = free_port(), out_dir / "stdout.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlops-serve"), "--serving-dir", str(serving_dir), "--port", str(port), "--log-text"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MLOPS_THREADS": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(f"{url}/health", stopped=process_stopped(proc))
            for i in range(12):
                body = json.dumps({"sentences": SENTENCES[i % 6 : i % 6 + 1 + i % 3]}).encode()
                assert http("POST", f"{url}/predict", body, {"Content-Type": "application/json", "X-Request-ID": f"req-{i}"})[0] == 200
            assert http("POST", f"{url}/predict", b'{"sentences": []}', {"Content-Type": "application/json", "X-Request-ID": "bad-1"})[0] == 422
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return log


def our_lines(log: Path) -> list[dict]:
    return [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{") and '"request_id"' in l]


def test_log_has_uvicorn_noise_and_our_lines(app_log):
    text = app_log.read_text()
    assert "Uvicorn running" in text or "Started server" in text  # the shipper must skip these
    lines = our_lines(app_log)
    predicts = [l for l in lines if l["event"] == "predict"]
    assert len(predicts) == 12 and all(l["model"] == "main" and "text" in l["predictions"][0] for l in predicts)


def test_ship_from_a_file_and_from_stdin(app_log, tmp_path):
    proc = run_cli("mlops-ship", app_log, "--window", tmp_path / "file.jsonl")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = our_lines(app_log)
    n_predictions = sum(l.get("n", 0) for l in lines if l["event"] == "predict")
    assert stats["records"] == len(lines) and stats["predictions"] == n_predictions and stats["lines"] > stats["records"]
    with open(app_log, "rb") as stdin:
        piped = subprocess.run(
            [str(BIN / "mlops-ship"), "-", "--window", str(tmp_path / "stdin.jsonl")], stdin=stdin, capture_output=True, timeout=120
        )
    assert piped.returncode == 0, piped.stderr
    assert (tmp_path / "stdin.jsonl").read_text() == (tmp_path / "file.jsonl").read_text()
    rows = [json.loads(l) for l in (tmp_path / "file.jsonl").read_text().splitlines()]
    assert len(rows) == n_predictions and {r["text"] for r in rows} <= set(SENTENCES)
    assert not list(tmp_path.glob(".*tmp*"))  # no staging file left behind


def test_ship_refuses_bad_arguments(tmp_path):
    assert run_cli("mlops-ship").returncode == 2
    missing = run_cli("mlops-ship", tmp_path / "missing.log")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_ship_from_cloudwatch_logs_on_a_moto_server(app_log, moto_server, tmp_path):
    import boto3

    logs = boto3.client("logs", endpoint_url=moto_server, region_name="eu-west-1")
    group = "/aws/lambda/mlops-basics"
    logs.create_log_group(logGroupName=group)
    messages = [
        "INIT_START Runtime Version: python:3.11",
        "START RequestId: 1 Version: 3",
        *[l for l in app_log.read_text().splitlines() if l.strip()],
        "END RequestId: 1",
        "REPORT RequestId: 1 Duration: 9.1 ms",
    ]
    now = int(time.time() * 1000) - 60_000
    for k, stream in enumerate(("2026/11/27/[3]aaa", "2026/11/27/[3]bbb")):  # two execution environments, half the lines each
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        logs.put_log_events(
            logGroupName=group, logStreamName=stream, logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(messages) if i % 2 == k]
        )
    proc = run_cli(
        "mlops-ship",
        "--cloudwatch",
        group,
        "--endpoint-url",
        moto_server,
        "--region",
        "eu-west-1",
        "--since",
        "1h",
        "--window",
        tmp_path / "cw.jsonl",
    )
    assert proc.returncode == 0, proc.stderr
    assert run_cli("mlops-ship", app_log, "--window", tmp_path / "file.jsonl").returncode == 0
    key = lambda r: (r["request_id"], r["index"])
    rows_cw = sorted(map(json.loads, (tmp_path / "cw.jsonl").read_text().splitlines()), key=key)
    rows_file = sorted(map(json.loads, (tmp_path / "file.jsonl").read_text().splitlines()), key=key)
    assert rows_cw == rows_file and len(rows_cw) > 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["lines"] == len(messages)
    missing = run_cli("mlops-ship", "--cloudwatch", "/aws/lambda/nothing", "--endpoint-url", moto_server, "--region", "eu-west-1")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


class RecordingBulk(BaseHTTPRequestHandler):
    """Records every request and answers like Elasticsearch: `_bulk` (validating the NDJSON), `_index_template`.
    `reject` holds document texts to refuse with a mapping error; `busy` how many bulk requests to answer 429 first."""

    requests, reject, busy = [], set(), [0]

    def _answer(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        RecordingBulk.requests.append({"method": "PUT", "path": self.path, "headers": dict(self.headers), "body": body})
        json.loads(body)
        self._answer(200, {"acknowledged": True})

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        RecordingBulk.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
        if self.path != "/_bulk":
            return self._answer(404, {"error": "no such route"})
        if RecordingBulk.busy[0] > 0:
            RecordingBulk.busy[0] -= 1
            return self._answer(429, {"error": {"type": "es_rejected_execution_exception"}, "status": 429})
        # What Elasticsearch requires of the body: newline-terminated NDJSON, action lines followed by their source.
        if not body.endswith(b"\n") or self.headers["Content-Type"] != "application/x-ndjson":
            return self._answer(400, {"error": "bad NDJSON"})
        lines = body.decode().split("\n")[:-1]
        if len(lines) % 2:
            return self._answer(400, {"error": "odd number of lines"})
        items = []
        for action_line, doc_line in zip(lines[::2], lines[1::2]):
            action, doc = json.loads(action_line), json.loads(doc_line)
            ((op, meta),) = action.items()
            if op != "index" or not meta.get("_index") or not meta.get("_id"):
                return self._answer(400, {"error": f"bad action {action}"})
            if doc.get("text") in RecordingBulk.reject:
                items.append(
                    {
                        op: {
                            "_index": meta["_index"],
                            "_id": meta["_id"],
                            "status": 400,
                            "error": {"type": "mapper_parsing_exception", "reason": "failed to parse field [text]"},
                        }
                    }
                )
            else:
                items.append({op: {"_index": meta["_index"], "_id": meta["_id"], "status": 201, "result": "created"}})
        self._answer(200, {"took": 3, "errors": any(i["index"]["status"] >= 300 for i in items), "items": items})

    def log_message(self, *args):
        pass


@pytest.fixture
def bulk_server():
    RecordingBulk.requests.clear()
    RecordingBulk.reject.clear()
    RecordingBulk.busy[0] = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingBulk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_bulk_indexing_sends_valid_ndjson(app_log, bulk_server):
    proc = run_cli("mlops-ship", app_log, "--es-url", f"http://elastic:s%3Dcret@{bulk_server}", "--install-template", "--batch", "5")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    lines = our_lines(app_log)
    n_docs = len(lines) + sum(l.get("n", 0) for l in lines if l["event"] == "predict")
    assert stats["indexed"] == n_docs
    template, *bulks = RecordingBulk.requests
    # bulk_requests counts the batches sent to _bulk: not the template PUT, and nothing was sent twice.
    assert stats["bulk_requests"] == len(bulks) == math.ceil(n_docs / 5) and stats["resent"] == 0
    assert (template["method"], template["path"]) == ("PUT", "/_index_template/mlops-requests")
    assert json.loads(template["body"])["index_patterns"] == ["mlops-requests-*"]
    expected_auth = "Basic " + base64.b64encode(b"elastic:s=cret").decode()
    assert all(r["headers"]["Authorization"] == expected_auth for r in RecordingBulk.requests)
    docs, ids = [], []
    for r in bulks:
        assert r["path"] == "/_bulk" and r["headers"]["Content-Type"] == "application/x-ndjson" and r["body"].endswith(b"\n")
        parts = [json.loads(l) for l in r["body"].decode().splitlines()]
        assert 0 < len(parts) // 2 <= 5
        for action, doc in zip(parts[::2], parts[1::2]):
            assert re.fullmatch(r"mlops-requests-\d{4}\.\d{2}\.\d{2}", action["index"]["_index"])
            ids.append(action["index"]["_id"])
            docs.append(doc)
    assert len(docs) == n_docs and len(set(ids)) == n_docs
    requests = [d for d in docs if d["doc_type"] == "request"]
    predictions = [d for d in docs if d["doc_type"] == "prediction"]
    assert {d["request_id"] for d in requests} == {l["request_id"] for l in lines}
    assert [d["status"] for d in requests if d["request_id"] == "bad-1"] == [422]
    assert {(d["error"], d["client_error"]) for d in requests if d["request_id"] == "bad-1"} == {(0, 1)}
    assert all(0 <= d["p_acceptable"] <= 1 and d["label"] in ("acceptable", "unacceptable") and d["model"] == "main" for d in predictions)
    from mlops_basics.ops.monitoring.shipping import index_template

    mapped = set(index_template()["template"]["mappings"]["properties"])
    assert set().union(*docs) <= mapped  # the template is strict: any other field would be refused
    # Shipping the same lines again sends the same ids: documents are overwritten, not duplicated.
    RecordingBulk.requests.clear()
    assert run_cli("mlops-ship", app_log, "--es-url", f"http://{bulk_server}").returncode == 0
    again = [json.loads(l)["index"]["_id"] for r in RecordingBulk.requests for l in r["body"].decode().splitlines()[::2]]
    assert sorted(again) == sorted(ids)


def test_bulk_retries_when_busy_and_reports_refused_documents(app_log, bulk_server):
    RecordingBulk.busy[0] = 2
    proc = run_cli("mlops-ship", app_log, "--es-url", f"http://{bulk_server}")
    assert proc.returncode == 0, proc.stderr
    assert [r["path"] for r in RecordingBulk.requests] == ["/_bulk"] * 3  # two 429s, then accepted
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (stats["bulk_requests"], stats["resent"]) == (1, 2)  # one batch (fewer than 500 documents), sent twice more
    RecordingBulk.requests.clear()
    RecordingBulk.reject.add(SENTENCES[1])
    proc = run_cli("mlops-ship", app_log, "--es-url", f"http://{bulk_server}")
    assert proc.returncode == 1 and "were refused" in proc.stderr and "failed to parse field [text]" in proc.stderr, proc.stderr
    unreachable = run_cli("mlops-ship", app_log, "--es-url", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 1 and "could not reach" in unreachable.stderr


def test_ship_makes_the_prediction_rows_of_each_record_once(app_log, bulk_server, monkeypatch):
    "The rows `ship` returns are the ones it indexes: `prediction_rows` runs once per record, not again in `to_documents`."
    from mlops_basics.ops.monitoring import shipping as monitoring  # patched where `ship` looks it up

    calls = []

    def counted(records):
        records = list(records)
        calls.append(len(records))
        return original(records)

    original = monitoring.prediction_rows
    monkeypatch.setattr(monitoring, "prediction_rows", counted)
    stats, rows = monitoring.ship(monitoring.read_log_lines(app_log), monitoring.BulkIndexer(f"http://{bulk_server}"))
    assert calls == [1] * stats.records and stats.records == len(our_lines(app_log))
    indexed = [json.loads(l) for r in RecordingBulk.requests for l in r["body"].decode().splitlines()[1::2]]
    assert [(d["request_id"], d["index"]) for d in indexed if d["doc_type"] == "prediction"] == [(r["request_id"], r["index"]) for r in rows]
    assert stats.indexed == len(indexed) == stats.records + len(rows)


def test_console_scripts_refuse_a_directory_as_output(tmp_path):
    "A directory where an output file should go is a one-line error (exit 2), and it is left as it was, with no staging file."
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("")
    proc = run_cli("mlops-monitor", "kibana", "--out", tmp_path / "taken")
    assert proc.returncode == 2 and "Is a directory" in proc.stderr, proc.stderr
    proc = run_cli("mlops-ship", ROOT / "README.md", "--window", tmp_path / "taken")
    assert proc.returncode == 2 and "Is a directory" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_kibana_export_and_index_template_are_current_and_consistent(tmp_path):
    proc = run_cli("mlops-monitor", "kibana", "--out", tmp_path / "dashboard.ndjson", "--template", tmp_path / "template.json")
    assert proc.returncode == 0, proc.stderr
    shipped = ROOT / "monitoring" / "kibana" / "dashboard.ndjson"
    assert (tmp_path / "dashboard.ndjson").read_text() == shipped.read_text()
    assert json.loads((tmp_path / "template.json").read_text()) == json.loads(
        (ROOT / "monitoring" / "elasticsearch" / "index-template.json").read_text()
    )
    from mlops_basics.ops.monitoring.dashboards import check_saved_objects

    assert check_saved_objects(shipped.read_text()) == []
    objects = [json.loads(l) for l in shipped.read_text().splitlines()]
    assert [o["type"] for o in objects].count("visualization") == 6 and objects[-1]["type"] == "dashboard"
    titles = " ".join(o["attributes"]["title"] for o in objects)
    for what in ("Requests over time", "Label mix", "P(acceptable)", "Latency percentiles", "Error rate"):
        assert what in titles


# Drift -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(serving_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("drift") / "reference.jsonl"
    proc = run_cli("mlops-monitor", "reference", "--serving-dir", serving_dir, "--sample", "800", "--out", path)
    assert proc.returncode == 0, proc.stderr
    return path


def profile_window(serving_dir, sentences, path: Path) -> Path:
    from mlops_basics.core.artifacts import write_jsonl
    from mlops_basics.ops.monitoring.drift import profile_sentences
    from mlops_basics.serving.predictor import ONNXPredictor

    rows = profile_sentences(sentences, ONNXPredictor(serving_dir))
    return write_jsonl([{**r, "request_id": f"r{i}", "index": 0, "timestamp": "2026-11-27T12:00:00.000+00:00"} for i, r in enumerate(rows)], path)


def drift(serving_dir, reference, window, out, *extra) -> tuple[int, dict]:
    proc = run_cli("mlops-monitor", "drift", "--serving-dir", serving_dir, "--reference", reference, "--window", window, "--out", out, *extra)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads((out / "drift_summary.json").read_text())


def test_drift_passes_in_domain_and_fails_on_corrupted_inputs(serving_dir, reference, tmp_path):
    import numpy as np

    from mlops_basics.core.data import load_cola
    from mlops_basics.ops.monitoring.drift import corrupt

    splits = load_cola()
    in_domain = [e.sentence for e, d in zip(splits.validation, splits.domains) if d == "in_domain"]
    code, summary = drift(serving_dir, reference, profile_window(serving_dir, in_domain[:400], tmp_path / "in.jsonl"), tmp_path / "in")
    assert code == 0 and summary["passed"] and summary["failed"] == [], summary
    assert {n: c["status"] for n, c in summary["checks"].items()} == {
        "input.length": "pass",
        "input.tokens": "pass",
        "input.oov": "pass",
        "input.token_distribution": "pass",
        "prediction.label_share": "pass",
        "prediction.score": "pass",
        "concept.mcc": "skipped",
    }
    rng = np.random.default_rng(1)
    code, summary = drift(
        serving_dir, reference, profile_window(serving_dir, [corrupt(s, rng) for s in in_domain[-400:]], tmp_path / "bad.jsonl"), tmp_path / "bad"
    )
    assert code == 1 and not summary["passed"]
    assert {"input.length", "input.tokens", "input.oov", "input.token_distribution"} <= set(summary["failed"]), summary["failed"]
    assert summary["checks"]["input.oov"]["window_rate"] > summary["checks"]["input.oov"]["reference_rate"]
    html = (tmp_path / "bad" / "drift_report.html").read_text()
    assert "Drift detection method: Wasserstein" in html and "Drift score" in html  # Evidently's own rendering of the checks
    assert (tmp_path / "bad" / "token_drift_report.html").exists()
    assert summary["versions"]["evidently"].startswith("0.7")


def test_prediction_drift_and_concept_drift(serving_dir, reference, tmp_path):
    "Prediction drift from a window whose scores and labels moved; concept drift from feedback that stopped agreeing."
    from mlops_basics.core.artifacts import write_jsonl

    rows = [json.loads(l) for l in reference.read_text().splitlines()][:400]
    window = [{**r, "request_id": f"r{i}", "index": 0} for i, r in enumerate(rows)]
    share = sum(r["label"] == "acceptable" for r in rows) / len(rows)
    rare = "acceptable" if share < 0.5 else "unacceptable"
    write_jsonl([{**r, "p_acceptable": min(1.0, r["p_acceptable"] + 0.3), "label": rare} for r in window], tmp_path / "shifted.jsonl")
    code, summary = drift(serving_dir, reference, tmp_path / "shifted.jsonl", tmp_path / "shifted")
    assert code == 1 and summary["failed"] == ["prediction.label_share", "prediction.score"], summary["failed"]
    assert summary["checks"]["prediction.label_share"]["window_share"][rare] == 1.0
    # Concept drift: the window's predictions (two labels) against feedback that agrees, then against feedback that does not.
    labelled = [{**r, "label": "unacceptable" if i % 3 == 0 else "acceptable"} for i, r in enumerate(window)]
    write_jsonl(labelled, tmp_path / "labelled.jsonl")
    flip = {"acceptable": "unacceptable", "unacceptable": "acceptable"}
    write_jsonl([{"request_id": r["request_id"], "index": 0, "label": r["label"]} for r in labelled[:100]], tmp_path / "agree.jsonl")
    write_jsonl([{"request_id": r["request_id"], "index": 0, "label": flip[r["label"]]} for r in labelled[:100]], tmp_path / "disagree.jsonl")
    write_jsonl([{"request_id": r["request_id"], "index": 0, "label": r["label"]} for r in labelled[:10]], tmp_path / "few.jsonl")
    _, agree = drift(serving_dir, reference, tmp_path / "labelled.jsonl", tmp_path / "agree", "--feedback", tmp_path / "agree.jsonl")
    _, disagree = drift(serving_dir, reference, tmp_path / "labelled.jsonl", tmp_path / "disagree", "--feedback", tmp_path / "disagree.jsonl")
    _, few = drift(serving_dir, reference, tmp_path / "labelled.jsonl", tmp_path / "few", "--feedback", tmp_path / "few.jsonl")
    assert {k: agree["checks"]["concept.mcc"][k] for k in ("matched", "score", "accuracy", "status")} == {
        "matched": 100,
        "score": 1.0,
        "accuracy": 1.0,
        "status": "pass",
    }
    assert {k: disagree["checks"]["concept.mcc"][k] for k in ("score", "accuracy", "status")} == {"score": -1.0, "accuracy": 0.0, "status": "fail"}
    assert "concept.mcc" in disagree["failed"] and "concept.mcc" not in agree["failed"]
    assert few["checks"]["concept.mcc"]["status"] == "skipped" and "30 needed" in few["checks"]["concept.mcc"]["reason"]


def test_drift_report_tokenizes_each_sentence_once_and_writes_atomically(reference, tmp_path):
    from mlops_basics.core.artifacts import read_jsonl
    from mlops_basics.ops.monitoring.drift import drift_report

    rows = read_jsonl(reference)
    window = [{**r, "request_id": f"r{i}", "index": 0} for i, r in enumerate(rows[:60])]
    seen = []

    def tokenize(text):
        seen.append(text)
        return text.lower().split()

    summary = drift_report(rows, window, tmp_path / "ok", tokenize)
    assert sorted(seen) == sorted(r["text"] for r in [*rows, *window])  # the reference once, the window once
    assert summary["checks"]["input.token_distribution"]["sentences"] == len(window)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["drift_report.html", "drift_summary.json", "token_drift_report.html"]
    assert json.loads((tmp_path / "ok" / "drift_summary.json").read_text())["html"] == ["drift_report.html", "token_drift_report.html"]
    (tmp_path / "taken" / "drift_summary.json").mkdir(parents=True)  # the summary cannot be written
    with pytest.raises(IsADirectoryError):
        drift_report(rows, window, tmp_path / "taken", tokenize)
    assert not [p.name for p in (tmp_path / "taken").iterdir() if p.name.startswith(".")]  # no staging file left


def test_monitoring_and_shipper_never_import_torch(serving_dir, reference, app_log, tmp_path):
    "In a fresh interpreter: ship, profile and run the Evidently checks; torch, transformers and Lightning stay out."
    probe = f"""
import json, sys
from pathlib import Path
from mlops_basics.core.artifacts import read_jsonl
from mlops_basics.ops.monitoring.drift import drift_report, profile_sentences
from mlops_basics.ops.monitoring.shipping import read_log_lines, ship
stats, rows = ship(read_log_lines({str(app_log)!r}))
from mlops_basics.serving.predictor import ONNXPredictor
p = ONNXPredictor({str(serving_dir)!r})
window = profile_sentences(["A sentence.", "Another one here."] * 20, p)
summary = drift_report(read_jsonl({str(reference)!r}), window, {str(tmp_path / 'out')!r}, lambda t: p.tokenizer.encode(t).tokens)
import mlops_basics.ops.release.traffic, mlops_basics.ops.models.behaviour
print(json.dumps({{"heavy": sorted({{"torch", "transformers", "lightning", "pytorch_lightning"}} & set(sys.modules)), "checks": len(summary["checks"])}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "checks": 7}
