"""The serving side from outside: `mlops-serve` over real HTTP, its page in Chromium, schemathesis, the Lambda handler,
and a fresh virtual environment with only the serve extra."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN, free_port, http, json_lines, run_cli, serve

JSON = {"Content-Type": "application/json"}


def test_predict_health_and_metrics_over_http(server):
    url, log = server
    status, headers, body = http(
        "POST", f"{url}/predict", json.dumps({"sentences": ["She sang.", "Sang she the."]}).encode(), {**JSON, "X-Request-ID": "http-test-1"}
    )
    assert status == 200 and headers["x-request-id"] == "http-test-1"
    answer = json.loads(body)
    assert [round(sum(p["probabilities"].values()), 6) for p in answer["predictions"]] == [1.0, 1.0]
    health = json.loads(http("GET", f"{url}/health")[2])
    assert health["status"] == "ready" and health["model"]["version"] == answer["model_version"]
    metrics = http("GET", f"{url}/metrics")[2].decode()
    assert 'mlops_requests_total{method="POST",route="/predict",status="200"}' in metrics
    assert "mlops_prediction_score_bucket" in metrics
    # No waiting: the app writes (and flushes) a request's log line before the response leaves it.
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]
    mine = [l for l in lines if l.get("request_id") == "http-test-1"]
    assert len(mine) == 1 and mine[0]["event"] == "predict" and mine[0]["n"] == 2 and "text" not in mine[0]["predictions"][0]


BAD_REQUESTS = {
    "empty batch": (b'{"sentences": []}', JSON, 422),
    "too many": (json.dumps({"sentences": ["a"] * 17}).encode(), JSON, 422),
    "too long": (json.dumps({"sentences": ["a" * 1001]}).encode(), JSON, 422),
    "wrong type": (b'{"sentences": "just one string"}', JSON, 422),
    "null": (b"null", JSON, 422),
    "malformed": (b'{"sentences": [', JSON, 400),
    "invalid utf-8": (b'{"sentences": ["\xc3\x28"]}', JSON, 400),
    "wrong content type": (b'{"sentences": ["a"]}', {"Content-Type": "text/plain"}, 415),
    "no content type": (b'{"sentences": ["a"]}', {}, 415),
    "huge body": (b'{"sentences": ["' + b"a" * 2_000_000 + b'"]}', JSON, 413),
}


def raw_post(url: str, path: str, body: bytes, headers: dict, chunked: bool = False) -> tuple[int, bytes]:
    """POST over a plain socket, tolerating a server that answers (e.g. 413) and closes before the body is sent.
    `chunked` sends the body in 64 KiB chunks with no Content-Length, as a streaming client does."""
    host, port = url.removeprefix("http://").split(":")
    length = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Host": host, **length, "Connection": "close"}.items())
    if chunked:
        pieces = [body[i : i + 65536] for i in range(0, len(body), 65536)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        try:
            sock.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server has already answered
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_clear_4xx(server, name):
    body, headers, expected = BAD_REQUESTS[name]
    status, answer = raw_post(server[0], "/predict", body, headers)
    assert status == expected, answer[:500]
    assert "detail" in json.loads(answer)


def test_chunked_body_over_the_limit_gets_413(server):
    "No Content-Length to refuse up front: the bytes are counted as they arrive, and the answer is still a JSON 413."
    body = b'{"sentences": ["' + b"a" * 2_000_000 + b'"]}'
    status, answer = raw_post(server[0], "/predict", body, JSON, chunked=True)
    assert status == 413, answer[:500]
    assert json.loads(answer) == {"detail": "the request body is larger than 1000000 bytes"}
    small_status, small_answer = raw_post(server[0], "/predict", b'{"sentences": ["She sang."]}', JSON, chunked=True)
    assert small_status == 200 and len(json.loads(small_answer)["predictions"]) == 1


class FailingSession:
    "Stands in for an ONNX Runtime session that has started to fail."

    def run(self, *args, **kwargs):
        raise RuntimeError("the ONNX session failed")


def test_predict_tokenizes_each_sentence_once(serving_dir):
    from fastapi.testclient import TestClient

    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.predictor import ONNXPredictor
    from mlops_basics.serving.settings import ServeSettings

    predictor = ONNXPredictor(serving_dir, threads=1)
    client = TestClient(create_app(ServeSettings(serving_dir=str(serving_dir)), predictor=predictor))
    encoded = []

    class Counting:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def encode_batch(self, sentences):
            encoded.extend(sentences)
            return self.tokenizer.encode_batch(sentences)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    predictor.tokenizer = Counting(predictor.tokenizer)
    response = client.post("/predict", json={"sentences": ["She sang.", "Sang she the.", "Hello 🦘"]})
    assert response.status_code == 200 and len(response.json()["predictions"]) == 3
    assert encoded == ["She sang.", "Sang she the.", "Hello 🦘"]


def test_metadata_without_metrics_still_serves(serving_dir, tmp_path):
    "Validation metrics are optional in a serving directory: /health says None rather than failing."
    from fastapi.testclient import TestClient

    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.settings import ServeSettings

    copy = tmp_path / "serving"
    shutil.copytree(serving_dir, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    for spec in meta["variants"].values():
        spec.pop("metrics")
    (copy / "metadata.json").write_text(json.dumps(meta))
    client = TestClient(create_app(ServeSettings(serving_dir=str(copy))))
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["model"]["validation_mcc"] is None
    assert health.json()["model"]["version"] == health.json()["models"]["main"]["version"]
    assert client.post("/predict", json={"sentences": ["She sang."]}).status_code == 200


def test_server_refuses_to_start_without_a_model(tmp_path):
    proc = run_cli("mlops-serve", "--serving-dir", tmp_path / "missing", "--port", str(free_port()), timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_server_refuses_a_corrupt_model(serving_dir, tmp_path):
    broken = tmp_path / "serving"
    shutil.copytree(serving_dir, broken)
    meta = json.loads((broken / "metadata.json").read_text())
    model = broken / meta["variants"][meta["default_variant"]]["file"]
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    proc = run_cli("mlops-serve", "--serving-dir", broken, "--port", str(free_port()), timeout=60)
    assert proc.returncode == 2 and "does not match its metadata" in proc.stderr


def test_schemathesis_finds_no_server_errors(server, tmp_path):
    "Property-based requests generated from the OpenAPI schema: no 5xx, and responses match the schema."
    url = server[0]
    proc = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--mode",
            "all",
            "--max-examples",
            "150",
            "--phases",
            "examples,coverage,fuzzing",
            "--seed",
            "1",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert generated and int(generated[1]) >= 100 and generated[1] == generated[2], proc.stdout[-2000:]


def test_page_in_headless_chromium(server):
    "A person types a sentence into the page and sees a label and its probability."
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert chromium, "Debian's chromium (or Chrome) is needed: .ci/system-packages installs it"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(server[0] + "/")
            page.fill("#sentence", "The children are playing in the garden.")
            page.click("#submit")
            page.wait_for_selector("#label", timeout=15_000)
            label, score = page.text_content("#label"), page.text_content("#score")
            width = page.eval_on_selector(".bar>div", "e => e.style.width")
        finally:
            browser.close()
    assert label in ("acceptable", "unacceptable") and score.endswith("% sure)") and width.endswith("%")


def test_lambda_handler_in_process(serving_dir, monkeypatch):
    monkeypatch.setenv("MLOPS_SERVING_DIR", str(serving_dir))
    from mlops_basics.serving import lambda_handler

    lambda_handler._runtime.clear()
    try:
        events = Path(__file__).parent / "events"
        for name, status in (("apigw_v1.json", 200), ("apigw_v2.json", 200), ("function_url.json", 200)):
            answer = lambda_handler.handler(json.loads((events / name).read_text()), None)
            assert answer["statusCode"] == status, (name, answer)
        direct = lambda_handler.handler(json.loads((events / "direct.json").read_text()), None)
        assert len(direct["predictions"]) == 1 and direct["model_version"]
        assert lambda_handler.handler({"sentences": ["x" * 5000]}, None)["statusCode"] == 422
    finally:
        lambda_handler._runtime.clear()  # the next test that uses the handler builds its own app


def test_lambda_direct_invocation_of_a_failing_model_raises(serving_dir):
    "A 5xx is the function's fault: a clear PredictFailed (a Lambda function error), not a JSONDecodeError or a 200."
    from mangum import Mangum

    from mlops_basics.serving import lambda_handler
    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.predictor import ONNXPredictor
    from mlops_basics.serving.settings import ServeSettings

    predictor = ONNXPredictor(serving_dir, threads=1)
    app = create_app(ServeSettings(serving_dir=str(serving_dir)), predictor=predictor)
    predictor.session = FailingSession()
    lambda_handler._runtime.clear()
    lambda_handler._runtime.update(app=app, mangum=Mangum(app, lifespan="off"))
    try:
        with pytest.raises(lambda_handler.PredictFailed, match=r"^/predict failed with status 500: ") as failed:
            lambda_handler.handler({"sentence": "She sang."}, None)
        answer = json.loads(str(failed.value).partition(": ")[2])
        assert answer["detail"] == "internal error" and re.fullmatch(r"[0-9a-f]{32}", answer["request_id"])
        http_answer = lambda_handler.handler(json.loads((Path(__file__).parent / "events" / "apigw_v2.json").read_text()), None)
        assert http_answer["statusCode"] == 500 and json.loads(http_answer["body"])["detail"] == "internal error"
    finally:
        lambda_handler._runtime.clear()


@pytest.mark.slow
def test_serve_extra_alone_in_a_fresh_venv(serving_dir, tmp_path):
    "Build the wheel, install only [serve,lambda] into a new venv: predictor, app and handler work there without torch."
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel = next(dist.glob("mlops_basics-*.whl"))
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "constraints.txt"), f"{wheel}[serve,lambda]"], check=True, timeout=900
    )
    probe = f"""
import json, sys, time
started = time.perf_counter()
from mlops_basics.serving.predictor import ONNXPredictor
p = ONNXPredictor({str(serving_dir)!r})
p.predict(["It works."])
first = time.perf_counter() - started
from fastapi.testclient import TestClient
from mlops_basics.serving.app import create_app
from mlops_basics.serving.settings import ServeSettings
client = TestClient(create_app(ServeSettings(serving_dir={str(serving_dir)!r})))
assert client.post("/predict", json={{"sentences": ["Hello there."]}}).status_code == 200
assert client.post("/v2/models/main/infer", json={{"inputs": [{{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["Hi."]}}]}}).status_code == 200
import os; os.environ["MLOPS_SERVING_DIR"] = {str(serving_dir)!r}
from mlops_basics.serving.lambda_handler import handler
assert handler({{"sentence": "Hi."}}, None)["predictions"]
print(json.dumps({{"heavy": sorted({{'torch', 'transformers', 'pytorch_lightning', 'lightning', 'mlserver'}} & set(sys.modules)), "first_prediction_s": first}}))
"""
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json"], capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert not names & {"torch", "transformers", "pytorch-lightning", "lightning"}
    size_mb = sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
    print(f"serve-only venv: {size_mb:.0f} MB, first prediction {result['first_prediction_s']:.2f} s")
    assert size_mb < 400  # a regression guard; the measured size is in the benchmarks page


@pytest.mark.parametrize("workers", [1, 2])
def test_every_line_the_server_prints_is_json(serving_dir, tmp_path, workers):
    "stdout and stderr of `mlops-serve`, from start-up to shutdown, with good, bad and unknown requests in between: JSON lines only."
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with serve("--serving-dir", serving_dir, "--workers", workers, log=out, errors=err) as url:
        assert http("POST", f"{url}/predict", json.dumps({"sentences": ["She sang."]}).encode(), JSON)[0] == 200
        assert http("POST", f"{url}/predict", b"{not json", JSON)[0] == 400
        assert http("GET", f"{url}/no-such-page")[0] == 404
        assert http("GET", f"{url}/metrics")[0] == 200
    records = json_lines(out.read_text(), out.name) + json_lines(err.read_text(), err.name)
    server = [r for r in records if r["event"] == "server"]
    assert all({"timestamp", "level", "logger", "message"} <= set(r) for r in server)
    messages = [r["message"] for r in server]
    assert "Application startup complete." in messages and any(m.startswith("Finished server process") for m in messages), messages
    requests = [r for r in records if r["event"] in ("predict", "request") and r["path"] != "/health"]  # /health: the start-up polls
    assert sorted((r["path"], r["status"]) for r in requests) == [("/predict", 200), ("/predict", 400), ("unmatched", 404)], requests


def test_every_line_the_lambda_runtime_client_prints_is_json(serving_dir, tmp_path):
    "The handler under the real runtime client (awslambdaric, JSON log format as the image sets it), answering and failing: JSON lines only."
    from mlops_basics.devtools.lambda_runtime import LambdaRuntimeAPI

    def invoke(serving: Path, log: Path):
        with LambdaRuntimeAPI() as api, open(log, "wb") as out:
            env = {
                **os.environ,
                "AWS_LAMBDA_RUNTIME_API": api.address,
                "AWS_LAMBDA_LOG_FORMAT": "JSON",
                "MLOPS_SERVING_DIR": str(serving),
                "MLOPS_THREADS": "1",
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "awslambdaric", "mlops_basics.serving.lambda_handler.handler"], stdout=out, stderr=subprocess.STDOUT, env=env
            )
            try:
                return api.invoke({"sentence": "She sang."}, timeout=120)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    ok = invoke(serving_dir, tmp_path / "ok.log")
    assert ok.kind == "response" and len(ok.payload["predictions"]) == 1, ok.payload
    failed = invoke(tmp_path / "missing", tmp_path / "failed.log")  # the model cannot load: the invocation fails
    assert failed.kind == "error" and failed.payload["errorType"] == "ArtifactsError", failed.payload
    assert [r["status"] for r in json_lines((tmp_path / "ok.log").read_text(), "ok.log") if r.get("event") == "predict"] == [200]
    errors = [r for r in json_lines((tmp_path / "failed.log").read_text(), "failed.log") if r.get("level") == "ERROR"]
    assert errors and errors[0]["errorType"] == "ArtifactsError" and errors[0]["stackTrace"], errors  # the runtime client's own line


def test_concurrent_requests_share_one_call_and_each_gets_its_own_answers(serving_dir, tmp_path):
    "Four requests (/predict and /v2 infer, 8 sentences in all) sent together are merged into one predictor call; each gets the answers it gets alone."
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.parser import text_string_to_metric_families

    from mlops_basics.serving.predictor import ONNXPredictor

    alone = ONNXPredictor(serving_dir, "fp32", threads=1)
    labels = alone.labels
    requests = [
        ("predict", ["The book was read by the student."]),
        ("v2", ["Book the the read.", "She sang beautifully."]),
        ("predict", ["Who do you think that left?", "John seems that is happy.", "The children are playing."]),
        ("v2", ["Mary left.", "Left Mary."]),
    ]

    def ask(url: str, kind: str, sentences: list[str]) -> list[list[float]]:
        "The probabilities (in the order of the labels) the server answers for `sentences`."
        if kind == "predict":
            status, _, raw = http("POST", f"{url}/predict", json.dumps({"sentences": sentences}).encode(), JSON)
            assert status == 200, raw
            return [[p["probabilities"][l] for l in labels] for p in json.loads(raw)["predictions"]]
        body = {"inputs": [{"name": "text", "shape": [len(sentences)], "datatype": "BYTES", "data": sentences}]}
        status, _, raw = http("POST", f"{url}/v2/models/main/infer", json.dumps(body).encode(), JSON)
        assert status == 200, raw
        flat = next(o for o in json.loads(raw)["outputs"] if o["name"] == "probabilities")["data"]
        return [flat[i : i + len(labels)] for i in range(0, len(flat), len(labels))]

    def samples(url: str) -> dict[str, float]:
        exposition = http("GET", f"{url}/metrics")[2].decode()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(exposition)
            for s in f.samples
            if s.name.startswith("mlops_batch_") and s.name.endswith(("_count", "_sum"))
        }

    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    # a long max_wait_ms and a call size of exactly the 8 sentences: the worker waits until all four requests are queued, whatever the timing
    with serve(
        "--serving-dir",
        serving_dir,
        "--variant",
        "fp32",
        "--batching",
        "on",
        "--max-batch-sentences",
        8,
        "--max-wait-ms",
        600_000,
        log=out,
        errors=err,
    ) as url:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: ask(url, *r), requests))
        batches = samples(url)
    for (_, sentences), answer in zip(requests, answers):
        expected = [[p.probabilities[l] for l in labels] for p in alone.predict_with_stats(sentences)[0]]
        assert len(answer) == len(sentences)
        np.testing.assert_allclose(answer, expected, rtol=0, atol=1e-5)
    assert (batches["mlops_batch_requests_count"], batches["mlops_batch_requests_sum"], batches["mlops_batch_sentences_sum"]) == (1, 4, 8)
    logged = sorted(r["n"] for r in json_lines(out.read_text(), out.name) if r["event"] == "predict")
    assert logged == [1, 2, 2, 3]  # one log line per request, with its own sentences
    server = [r for r in json_lines(err.read_text(), err.name) if r["event"] == "server"]
    warned = [
        r for r in server if r["level"] not in ("info", "debug") and "MLOPS_FEEDBACK_KEY" not in r["message"]
    ]  # no key: said at start, on purpose
    assert warned == [], server  # no other warning, no task left hanging at shutdown
    assert "Application shutdown complete." in [r["message"] for r in server]


def test_with_batching_on_the_sessions_share_the_cores_among_the_calls(serving_dir):
    "Two merged calls at once get half the cores each (not two sessions' worth of spinning threads); without batching, ONNX Runtime's default."
    from mlops_basics.serving.app import load_predictors
    from mlops_basics.serving.settings import ServeSettings

    def intra_op_threads(**settings):
        (predictor,) = load_predictors(ServeSettings(serving_dir=str(serving_dir), **settings)).values()
        return predictor.session.get_session_options().intra_op_num_threads

    cores = len(os.sched_getaffinity(0))
    assert intra_op_threads(batching=True, batch_calls=2) == max(1, cores // 2)
    assert intra_op_threads(batching=True, batch_calls=1) == cores
    assert intra_op_threads(batching=False) == 0  # ONNX Runtime decides
    assert intra_op_threads(batching=True, threads=3) == 3  # MLOPS_THREADS wins


def test_a_failing_request_in_a_merged_call_fails_alone(serving_dir):
    "When one request of a merged call makes the model fail, the call is retried request by request: only that request gets the 500."
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.predictor import ONNXPredictor
    from mlops_basics.serving.settings import ServeSettings

    class Refusing(ONNXPredictor):
        "A real predictor that fails on one sentence, as a model that cannot take some input would."

        def predict_with_stats(self, sentences):
            if "poison" in sentences:
                raise ValueError("the model cannot take this sentence")
            return super().predict_with_stats(sentences)

    predictor = Refusing(serving_dir, "fp32", threads=1)
    app = create_app(ServeSettings(serving_dir=str(serving_dir), batching=True, max_batch_sentences=3, max_wait_ms=600_000), predictor=predictor)
    with TestClient(app) as client:  # one event loop for all requests, as in a server

        def ask(sentence: str):
            return client.post("/predict", json={"sentences": [sentence]})

        with ThreadPoolExecutor(3) as pool:
            fine, poisoned, also_fine = pool.map(ask, ["She sang.", "poison", "Sang she."])
        exposition = client.get("/metrics").text
    assert (fine.status_code, poisoned.status_code, also_fine.status_code) == (200, 500, 200)
    assert poisoned.json() == {"detail": "internal error", "request_id": poisoned.headers["x-request-id"]}
    assert fine.json()["predictions"][0]["probabilities"] == pytest.approx(predictor.predict("She sang.")[0].probabilities, abs=1e-5)
    assert 'mlops_batch_requests_count{model="main"} 2.0' in exposition  # the merged call of three failed; the two answered one by one
