"""The Open Inference Protocol (KServe v2) from outside: `mlops-serve` over real HTTP asked by Triton's own client and by the
protocol's raw JSON examples, the Lambda handler, and the same predictor inside Seldon's MLServer (its own environment)."""

import base64
import copy
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from test_serving import raw_post  # a POST that tolerates the server answering 413 before the body is sent
from tritonclient.utils import InferenceServerException

from conftest import ROOT
from mlops_basics.devtools.test_utils import free_port, http, running_server, serve

JSON = {"Content-Type": "application/json"}
SENTENCES = ["The book was read by the student.", "Book the the read.", "She sang beautifully.", "Who do you think that left?"]
EXAMPLE = {"id": "42", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": SENTENCES[:2]}]}  # the protocol's example, our tensor


@pytest.fixture(scope="module")
def protocol_server(serving_dir, tmp_path_factory):
    "`mlops-serve` with two models (blue: fp32, green: int8) and at most 8 sentences per request; yields its base URL."
    log = tmp_path_factory.mktemp("protocol") / "stdout.log"
    with serve(
        "--model", f"blue={serving_dir}@fp32", "--model", f"green={serving_dir}@int8", "--max-batch", "8", "--max-chars", "200", log=log
    ) as url:
        yield url


def post_json(url: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    "(status, headers, JSON body) of a JSON POST."
    status, answer_headers, raw = http("POST", url, json.dumps(body).encode(), {**JSON, **(headers or {})})
    return status, answer_headers, json.loads(raw)


def predict(url: str, sentences: list[str], model: str) -> list[dict]:
    "The app's own /predict answers for `sentences` from `model`."
    status, _, answer = post_json(f"{url}/predict", {"sentences": sentences, "model": model})
    assert status == 200, answer
    return answer["predictions"]


def assert_same_as_predict(labels, probabilities, predictions: list[dict], columns: list[str], atol: float = 1e-6):
    "Protocol outputs equal /predict's answers: the same labels, the same probabilities (float32)."
    assert [l.decode() if isinstance(l, bytes) else l for l in labels] == [p["label"] for p in predictions]
    expected = np.array([[p["probabilities"][c] for c in columns] for p in predictions], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(probabilities, dtype=np.float32).reshape(expected.shape), expected, rtol=0, atol=atol)


def model_labels(url: str) -> list[str]:
    return json.loads(http("GET", f"{url}/health")[2])["models"]["blue"]["labels"]


def metric(exposition: str, name: str, **labels) -> float:
    "The value of one sample of the Prometheus text `exposition` (0 when it is absent)."
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for f in text_string_to_metric_families(exposition)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.parametrize("binary", [True, False], ids=["binary tensors", "JSON tensors"])
def test_tritonclient_sees_ready_models_and_answers_equal_to_predict(protocol_server, binary):
    url = protocol_server
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("blue") and client.is_model_ready("green") and not client.is_model_ready("red")
        server = client.get_server_metadata()
        assert server["name"] == "mlops-basics" and "binary_tensor_data" in server["extensions"]
        health = json.loads(http("GET", f"{url}/health")[2])
        for name in ("blue", "green"):
            meta = client.get_model_metadata(name)
            assert meta["versions"] == [health["models"][name]["version"]] and meta["platform"] == "onnxruntime_onnx"
            assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
            assert meta["outputs"] == [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
            ]
            text = triton.InferInput("text", [len(SENTENCES)], "BYTES")
            text.set_data_from_numpy(np.array(SENTENCES, dtype=object), binary_data=binary)
            outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
            result = client.infer(name, [text], outputs=outputs, request_id=f"triton-{name}")
            response = result.get_response()
            assert (response["model_name"], response["model_version"], response["id"]) == (name, meta["versions"][0], f"triton-{name}")
            assert result.as_numpy("probabilities").dtype == np.float32 and result.as_numpy("probabilities").shape == (len(SENTENCES), 2)
            assert_same_as_predict(result.as_numpy("label"), result.as_numpy("probabilities"), predict(url, SENTENCES, name), model_labels(url))
            by_version = client.infer(name, [text], model_version=meta["versions"][0])  # no outputs named: all of them, binary
            assert_same_as_predict(
                by_version.as_numpy("label"), by_version.as_numpy("probabilities"), predict(url, SENTENCES, name), model_labels(url)
            )
        with pytest.raises(InferenceServerException, match="model 'blue' has no version 'v9'"):
            client.infer("blue", [text], model_version="v9")
        with pytest.raises(InferenceServerException, match="unknown model 'red'"):
            client.get_model_metadata("red")
        assert not client.is_model_ready("blue", model_version="v9")
    finally:
        client.close()


def test_raw_json_examples_of_the_protocol(protocol_server):
    url = protocol_server
    assert [json.loads(http("GET", f"{url}{p}")[2]) for p in ("/v2/health/live", "/v2/health/ready", "/v2/models/green/ready")] == [
        {"live": True},
        {"ready": True},
        {"name": "green", "ready": True},
    ]
    status, headers, answer = post_json(f"{url}/v2/models/green/infer", EXAMPLE)
    assert status == 200 and headers["content-type"] == "application/json" and headers["x-model"] == "green"
    assert (answer["model_name"], answer["id"]) == ("green", "42")
    assert [(o["name"], o["datatype"], o["shape"]) for o in answer["outputs"]] == [("label", "BYTES", [2]), ("probabilities", "FP32", [2, 2])]
    assert_same_as_predict(answer["outputs"][0]["data"], answer["outputs"][1]["data"], predict(url, SENTENCES[:2], "green"), model_labels(url))
    nested = {
        "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [[s] for s in SENTENCES[:2]]}],
        "outputs": [{"name": "probabilities"}],
    }
    status, _, only = post_json(f"{url}/v2/models/green/infer", nested)
    assert status == 200 and [o["name"] for o in only["outputs"]] == ["probabilities"] and only["outputs"][1:] == []
    assert only["outputs"][0]["data"] == answer["outputs"][1]["data"]
    assert only["id"] and only["id"] != "42"  # no id asked for: the app's request id, as in its log


def test_binary_outputs_follow_the_json_header(protocol_server):
    url = protocol_server
    body = {**EXAMPLE, "parameters": {"binary_data_output": True}}
    status, headers, raw = http("POST", f"{url}/v2/models/blue/infer", json.dumps(body).encode(), JSON)
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    size = int(headers["inference-header-content-length"])
    header, blobs = json.loads(raw[:size]), raw[size:]
    label, probabilities = header["outputs"]
    assert "data" not in label and label["parameters"]["binary_data_size"] + probabilities["parameters"]["binary_data_size"] == len(blobs)
    labels, at = [], 0
    while at < label["parameters"]["binary_data_size"]:
        n = int.from_bytes(blobs[at : at + 4], "little")
        labels.append(blobs[at + 4 : at + 4 + n].decode())
        at += 4 + n
    assert_same_as_predict(labels, np.frombuffer(blobs[at:], dtype="<f4"), predict(url, SENTENCES[:2], "blue"), model_labels(url))


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v2/models/red/infer", EXAMPLE, 404, "unknown model 'red': this server has blue, green"),
        ("/v2/models/blue/versions/v9/infer", EXAMPLE, 404, "model 'blue' has no version 'v9'"),
        (
            "/v2/models/blue/infer",
            {"inputs": [{"name": "text", "shape": [9], "datatype": "BYTES", "data": ["Hi."] * 9}]},
            400,
            "input 'text': 1 to 8 sentences per request, got 9",
        ),
        (
            "/v2/models/blue/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x" * 201]}]},
            400,
            "input 'text': sentence 0 is longer than 200 characters",
        ),
        (
            "/v2/models/blue/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "INT64", "data": [1]}]},
            400,
            "input 'text' must be BYTES, got INT64",
        ),
        (
            "/v2/models/blue/infer",
            {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]},
            400,
            "input 'text': shape [3] does not match its 1 elements",
        ),
        ("/v2/models/blue/infer", {"input": []}, 400, "invalid inference request: inputs: Field required"),
    ],
    ids=["unknown model", "unknown version", "too many sentences", "sentence too long", "wrong datatype", "wrong shape", "no inputs"],
)
def test_errors_have_the_protocol_shape(protocol_server, path, body, status, message):
    got, _, answer = post_json(protocol_server + path, body)
    assert got == status and list(answer) == ["error"] and answer["error"].startswith(message), answer


def test_malformed_and_oversized_bodies(protocol_server):
    url = protocol_server
    status, _, raw = http("POST", f"{url}/v2/models/blue/infer", b"{not json", JSON)
    assert (status, json.loads(raw)) == (400, {"error": "the request body is not valid JSON"})
    for chunked in (False, True):  # refused on its Content-Length up front, or counted as the chunks arrive
        status, raw = raw_post(url, "/v2/models/blue/infer", b"x" * 1_000_001, JSON, chunked=chunked)  # the app's default max_body_bytes
        assert (status, json.loads(raw)) == (413, {"error": "the request body is larger than 1000000 bytes"}), chunked
    status, _, raw = http("GET", f"{url}/v2/models/red")
    assert (status, json.loads(raw)) == (404, {"error": "unknown model 'red': this server has blue, green"})


def test_protocol_requests_move_the_apps_metrics(protocol_server):
    url = protocol_server
    before = http("GET", f"{url}/metrics")[2].decode()
    assert post_json(f"{url}/v2/models/green/infer", EXAMPLE)[0] == 200
    assert post_json(f"{url}/v2/models/red/infer", EXAMPLE)[0] == 404
    after = http("GET", f"{url}/metrics")[2].decode()
    moved = lambda name, **labels: metric(after, name, **labels) - metric(before, name, **labels)
    route = "/v2/models/{model_name}/infer"
    assert moved("mlops_requests_total", route=route, status="200") == 1 and moved("mlops_requests_total", route=route, status="404") == 1
    assert moved("mlops_model_requests_total", model="green", assigned="request", status="200") == 1
    assert moved("mlops_predictions_total", model="green") == 2 and moved("mlops_input_tokens_count", model="green") == 2


def test_the_lambda_handler_speaks_the_protocol(serving_dir, monkeypatch):
    "API Gateway (HTTP API) events for the /v2 routes reach the same app through the handler."
    monkeypatch.setenv("MLOPS_SERVING_DIR", str(serving_dir))
    from mlops_basics.serving import lambda_handler

    lambda_handler._runtime.clear()
    event = json.loads((Path(__file__).parent / "events" / "apigw_v2.json").read_text())

    def call(method: str, path: str, body=None) -> tuple[int, dict]:
        e = copy.deepcopy(event)
        e.update(routeKey=f"{method} {path}", rawPath=path, body=json.dumps(body) if body is not None else None, isBase64Encoded=False)
        e["requestContext"]["http"].update(method=method, path=path)
        answer = lambda_handler.handler(e, None)
        payload = base64.b64decode(answer["body"]) if answer.get("isBase64Encoded") else answer["body"]
        return answer["statusCode"], json.loads(payload)

    try:
        assert call("GET", "/v2/models/main/ready") == (200, {"name": "main", "ready": True})
        status, answer = call("POST", "/v2/models/main/infer", EXAMPLE)
        assert (
            status == 200
            and answer["model_name"] == "main"
            and answer["outputs"][0]["data"] == [p["label"] for p in lambda_handler.handler({"sentences": SENTENCES[:2]}, None)["predictions"]]
        )
        assert call("POST", "/v2/models/other/infer", EXAMPLE) == (404, {"error": "unknown model 'other': this server has main"})
    finally:
        lambda_handler._runtime.clear()  # the next test that uses the handler builds its own app


@pytest.fixture(scope="module")
def mlserver_url(mlserver_bin, serving_dir, tmp_path_factory):
    "MLServer serving the tiny model (fp32, as the app's `blue`) as `cola` with `CoLARuntime` and adaptive batching on; yields its HTTP base URL."
    from mlops_basics.serving.mlserver import mlserver_repository

    work = tmp_path_factory.mktemp("mlserver")
    http_port = free_port()
    repository = mlserver_repository(
        work / "repository",
        serving_dir,
        variant="fp32",
        threads=1,
        max_batch_size=8,
        max_batch_time=0.05,
        http_port=http_port,
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    with running_server([mlserver_bin, "start", repository], "/v2/models/cola/ready", http_port, work / "mlserver.log", cwd=work) as url:
        yield url


def test_mlserver_runs_the_predictor_and_answers_as_the_app(mlserver_url, protocol_server):
    client = triton.InferenceServerClient(mlserver_url.removeprefix("http://"))
    try:
        assert client.is_server_ready() and client.is_model_ready("cola") and client.get_server_metadata()["name"] == "mlserver"
        text = triton.InferInput("text", [len(SENTENCES)], "BYTES")
        text.set_data_from_numpy(np.array(SENTENCES, dtype=object), binary_data=False)  # MLServer's REST server takes JSON tensors only
        result = client.infer("cola", [text], outputs=[triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities")])
        blue = json.loads(http("GET", f"{protocol_server}/health")[2])["models"]["blue"]
        assert result.get_response()["model_version"] == blue["version"]
        assert_same_as_predict(
            result.as_numpy("label"), result.as_numpy("probabilities"), predict(protocol_server, SENTENCES, "blue"), blue["labels"]
        )
        wrong = triton.InferInput("input_ids", [1], "INT64")
        wrong.set_data_from_numpy(np.array([1], dtype=np.int64), binary_data=False)
        with pytest.raises(InferenceServerException, match="the model takes one input, 'text'"):
            client.infer("cola", [wrong])
    finally:
        client.close()


def test_mlserver_adaptive_batches_answer_each_request_its_own(mlserver_url, protocol_server):
    "Concurrent one-sentence requests, which MLServer may merge into one batch: each still gets its own sentence's answer (fp32: padding moves it by less than 1e-6)."
    expected = {s: predict(protocol_server, [s], "blue")[0] for s in SENTENCES}

    def ask(sentence: str) -> tuple[str, dict]:
        status, _, answer = post_json(
            f"{mlserver_url}/v2/models/cola/infer", {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [sentence]}]}
        )
        assert status == 200, answer
        return sentence, answer

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, SENTENCES * 4))
    labels = model_labels(protocol_server)
    for sentence, answer in answers:
        assert answer["outputs"][0]["shape"] == [1]
        assert_same_as_predict(answer["outputs"][0]["data"], answer["outputs"][1]["data"], [expected[sentence]], labels, atol=1e-5)


@pytest.mark.slow
def test_the_protocol_benchmark_takes_the_relative_serving_dir_make_bench_passes(mlserver_bin, serving_dir, tmp_path):
    "`make bench` names artifacts/serving relative to the checkout; the app and MLServer start in scratch directories and still load it."
    import sys

    from mlops_basics.core.artifacts import read_metadata
    from mlops_basics.serving.predictor import model_version

    out = tmp_path / "protocol.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "protocol_benchmark.py"), "--serving-dir", serving_dir.name, "--model-dir", "no-model"]
    options = ["--servers", "app,mlserver", "--batches", "1", "--rounds", "1", "--duration", "2", "--out", str(out)]
    proc = subprocess.run([*command, *options], cwd=serving_dir.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"]["serving_dir_version"] == model_version(read_metadata(serving_dir))
    rows = {r["server"]: r for r in result["results"]}
    assert set(rows) == {"app /predict", "app /v2 infer", "MLServer"} and all(r["requests_per_s"] > 0 and r["non_2xx"] == 0 for r in rows.values()), (
        rows
    )


def protocol_benchmark(monkeypatch):
    "benchmarks/protocol_benchmark.py as a module (it imports its sibling serving_benchmark)."
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import protocol_benchmark

    return protocol_benchmark


def row(server, requests_per_s, cpu_ms, batch=1):
    return {"server": server, "batch": batch, "requests_per_s": requests_per_s, "cpu_ms_per_request": cpu_ms}


def test_the_protocol_targets_compare_like_with_like(monkeypatch):
    "Batching against adaptive batching, no batching against none; the batch-8 rows and the other pairing's framework never count."
    results = [
        row("app /predict", 110, 17.0),
        row("app /v2 infer", 100, 18.0),
        row("app /predict, no batching", 95, 19.0),
        row("MLServer", 100, 19.0),
        row("MLServer, adaptive batching (8, 5 ms)", 90, 20.0),
        row("naive FastAPI + PyTorch", 19, 100.0),
        row("MLServer", 1, 1.0, batch=8),  # another batch size: not a target
    ]
    got = protocol_benchmark(monkeypatch).targets(results)
    assert got["app_over_framework_at_batch_1"] == {
        "batching on": {"app /predict": 1.22, "app /v2 infer": 1.11},
        "batching off": {"app /predict, no batching": 0.95},
    }
    assert got["framework_cpu_over_app_at_batch_1"]["batching on"] == {"app /predict": 1.18, "app /v2 infer": 1.11}
    assert got["app_at_least_as_fast_as_the_framework_at_batch_1"] == {"batching on": True, "batching off": False}
    assert got["app_over_naive_at_batch_1"] == {"app /predict": 5.79, "app /v2 infer": 5.26, "app /predict, no batching": 5.0}
    assert got["app_at_least_5x_the_naive_app_at_batch_1"] is True


def test_a_pairing_with_a_side_not_measured_gets_no_verdict(monkeypatch):
    "A short look at two servers (`--servers app,mlserver`) pairs nothing: no verdict, not a vacuous pass."
    got = protocol_benchmark(monkeypatch).targets([row("app /predict", 110, 17.0), row("MLServer", 100, 19.0)])
    assert got["app_at_least_as_fast_as_the_framework_at_batch_1"] == {"batching on": None, "batching off": None}
    assert got["app_over_framework_at_batch_1"] == {} and got["app_at_least_5x_the_naive_app_at_batch_1"] is None
