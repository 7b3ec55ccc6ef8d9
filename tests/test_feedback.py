"""`POST /feedback` from outside: over real HTTP from `mlops-serve`, with its log lines and Prometheus counters, and through the Lambda handler."""

import io
import json
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from test_serving import JSON, raw_post

from mlops_basics.devtools.test_utils import http, json_lines


def predict(url: str, sentences: list[str], request_id: str) -> dict:
    status, _, body = http("POST", f"{url}/predict", json.dumps({"sentences": sentences}).encode(), {**JSON, "X-Request-ID": request_id})
    assert status == 200, body
    return json.loads(body)


def feedback(url: str, body: dict, request_id: str) -> tuple[int, dict]:
    status, _, answer = http("POST", f"{url}/feedback", json.dumps(body).encode(), {**JSON, "X-Request-ID": request_id})
    return status, json.loads(answer)


def log_of(log: Path, request_id: str) -> list[dict]:
    return [line for line in json_lines(log.read_text()) if line.get("request_id") == request_id]


def test_feedback_is_checked_counted_and_logged(server):
    url, log = server
    predicted = predict(url, ["She sang.", "Sang she the."], "fb-pred-1")
    wrong = "acceptable" if predicted["predictions"][1]["label"] == "unacceptable" else "unacceptable"
    status, answer = feedback(url, {"request_id": "fb-pred-1", "index": 1, "label": wrong}, "fb-good-1")
    assert status == 202 and answer == {
        "request_id": "fb-good-1",
        "prediction_request_id": "fb-pred-1",
        "index": 1,
        "label": wrong,
        "verified": True,
        "agrees": False,
    }
    [line] = log_of(log, "fb-good-1")
    assert line["event"] == "feedback" and line["status"] == 202 and line["path"] == "/feedback"
    assert (line["prediction_request_id"], line["index"], line["label"], line["predicted"]) == (
        "fb-pred-1",
        1,
        wrong,
        predicted["predictions"][1]["label"],
    )
    assert line["model_version"] == predicted["model_version"]
    metrics = http("GET", f"{url}/metrics")[2].decode()
    assert f'mlops_feedback_total{{label="{wrong}",model="main",model_version="{predicted["model_version"]}",outcome="disagree"}} 1.0' in metrics


BAD_FEEDBACK = {  # name: (body, expected status); each about the prediction "fb-pred-2" (one sentence)
    "unknown label": ({"request_id": "fb-pred-2", "index": 0, "label": "grammatical"}, 422),
    "label as a number": ({"request_id": "fb-pred-2", "index": 0, "label": 1}, 422),
    "malformed id": ({"request_id": "fb pred/2", "index": 0, "label": "acceptable"}, 422),
    "negative index": ({"request_id": "fb-pred-2", "index": -1, "label": "acceptable"}, 422),
    "index past the request": ({"request_id": "fb-pred-2", "index": 1, "label": "acceptable"}, 422),
    "index past any request": ({"request_id": "fb-pred-2", "index": 16, "label": "acceptable"}, 422),
    "extra field": ({"request_id": "fb-pred-2", "index": 0, "label": "acceptable", "user": "x"}, 422),
    "duplicate": ({"request_id": "fb-pred-2", "index": 0, "label": "unacceptable"}, 409),
}


def test_bad_feedback_gets_a_clear_4xx_and_is_never_logged_as_feedback(server):
    url, log = server
    predict(url, ["The book was read."], "fb-pred-2")
    assert feedback(url, {"request_id": "fb-pred-2", "index": 0, "label": "acceptable"}, "fb-first-2")[0] == 202
    for name, (body, expected) in BAD_FEEDBACK.items():
        status, answer = feedback(url, body, f"fb-bad-{len(name)}-{name.replace(' ', '-')}")
        assert status == expected and answer["detail"], (name, status, answer)
    oversized = json.dumps({"request_id": "fb-pred-2", "index": 0, "label": "acceptable", "pad": "x" * 4000}).encode()
    status, answer = raw_post(url, "/feedback", oversized, {**JSON, "X-Request-ID": "fb-bad-oversized"})
    assert status == 413 and "2048 bytes" in json.loads(answer)["detail"]
    status, answer = raw_post(url, "/feedback", b'{"request_id": "fb-pred-2"', {**JSON, "X-Request-ID": "fb-bad-malformed"})
    assert status == 400
    status, answer = raw_post(url, "/feedback", b'{}', {"Content-Type": "text/plain", "X-Request-ID": "fb-bad-type"})
    assert status == 415
    lines = [l for l in json_lines(log.read_text()) if str(l.get("request_id", "")).startswith("fb-bad-")]
    assert len(lines) == len(BAD_FEEDBACK) + 3 and all(l["event"] == "request" and 400 <= l["status"] < 500 for l in lines)
    feedback_lines = [l for l in json_lines(log.read_text()) if l.get("event") == "feedback" and l["prediction_request_id"] == "fb-pred-2"]
    assert [(l["request_id"], l["label"]) for l in feedback_lines] == [("fb-first-2", "acceptable")]  # the first label stands
    metrics = http("GET", f"{url}/metrics")[2].decode()
    assert 'mlops_feedback_rejected_total{reason="duplicate"}' in metrics and 'mlops_feedback_rejected_total{reason="out_of_range"}' in metrics


def test_feedback_on_a_prediction_this_process_did_not_answer_is_unverified(server):
    url, log = server
    status, answer = feedback(url, {"request_id": "answered-by-another-worker", "index": 3, "label": "acceptable"}, "fb-unverified")
    assert status == 202 and answer["verified"] is False and answer["agrees"] is None
    [line] = log_of(log, "fb-unverified")
    assert line["event"] == "feedback" and line["model"] is None and "predicted" not in line


def test_one_client_is_rate_limited_and_others_are_not(serving_dir):
    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.settings import ServeSettings

    app = create_app(ServeSettings(serving_dir=str(serving_dir), feedback_per_minute=1, feedback_burst=2))
    flooder, other = TestClient(app, client=("198.51.100.1", 5000)), TestClient(app, client=("198.51.100.2", 5000))
    body = {"request_id": "somewhere-else", "index": 0, "label": "acceptable"}
    statuses = [flooder.post("/feedback", json=body).status_code for _ in range(4)]
    assert statuses == [202, 202, 429, 429]
    refused = flooder.post("/feedback", json=body)
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert other.post("/feedback", json=body).status_code == 202
    assert 'mlops_feedback_rejected_total{reason="rate_limited"} 3.0' in app.state.metrics.exposition().decode()


def test_feedback_through_the_lambda_handler(serving_dir, monkeypatch):
    monkeypatch.setenv("MLOPS_SERVING_DIR", str(serving_dir))
    from mlops_basics.serving.observability import configure_request_logging

    stdout = io.StringIO()
    configure_request_logging(stdout)  # what CloudWatch Logs would receive
    from mlops_basics.serving import lambda_handler

    lambda_handler._runtime.clear()
    try:
        events = Path(__file__).parent / "events"
        predicted = lambda_handler.handler(json.loads((events / "apigw_v2.json").read_text()), None)
        request_id = json.loads(predicted["body"])["request_id"]
        event = json.loads((events / "apigw_v2.json").read_text())
        event.update(routeKey="POST /feedback", rawPath="/feedback", body=json.dumps({"request_id": request_id, "index": 0, "label": "acceptable"}))
        event["requestContext"].update(routeKey="POST /feedback", http={**event["requestContext"]["http"], "path": "/feedback"})
        event["headers"] = {**event["headers"], "x-request-id": "lambda-feedback-1"}
        answer = lambda_handler.handler(event, None)
        assert answer["statusCode"] == 202 and json.loads(answer["body"])["verified"] is True
        assert lambda_handler.handler(event, None)["statusCode"] == 409  # the same again
        direct = lambda_handler.handler({"request_id": "direct-elsewhere", "index": 0, "label": "unacceptable"}, None)
        assert direct["prediction_request_id"] == "direct-elsewhere" and direct["verified"] is False
        assert lambda_handler.handler({"request_id": "direct-elsewhere", "index": 0, "label": "maybe"}, None)["statusCode"] == 422
        lines = [l for l in json_lines(stdout.getvalue()) if l.get("event") == "feedback"]
        assert [l["prediction_request_id"] for l in lines] == [request_id, "direct-elsewhere"]
        schema = TestClient(lambda_handler.runtime()["app"]).get("/openapi.json").json()
        assert set(schema["paths"]["/feedback"]["post"]["responses"]) >= {"202", "409", "413", "415", "422", "429"}
    finally:
        lambda_handler._runtime.clear()
        configure_request_logging(sys.stdout)


KEY = "feedback-test-key-" + "0123456789abcdef" * 2  # 50 bytes


def signed_app(serving_dir, monkeypatch, key: str = KEY):
    "An app (one worker, one Lambda instance) with feedback signing on: each has only the key in common with another."
    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.settings import ServeSettings

    monkeypatch.setenv("MLOPS_FEEDBACK_KEY", key)
    return create_app(ServeSettings(serving_dir=str(serving_dir), feedback_burst=50))


def test_signed_tokens_cross_instances_and_refuse_forged_altered_expired_and_missing(serving_dir, monkeypatch):
    from mlops_basics.ops.monitoring.evaluation import feedback_records, join_feedback
    from mlops_basics.serving.feedback import FeedbackSigner

    one, other = TestClient(signed_app(serving_dir, monkeypatch)), TestClient(signed_app(serving_dir, monkeypatch))
    predicted = one.post("/predict", json={"sentences": ["She sang.", "Sang she the."]}, headers={"X-Request-ID": "tok-pred-1"}).json()
    tokens = [p["feedback_token"] for p in predicted["predictions"]]
    label = predicted["predictions"][1]["label"]
    answer = other.post("/feedback", json={"request_id": "tok-pred-1", "index": 1, "label": label, "token": tokens[1]})
    assert answer.status_code == 202 and (answer.json()["verified"], answer.json()["agrees"]) == (True, True)  # another instance checks it
    expired = FeedbackSigner([KEY.encode()], ttl=-1).issue("tok-pred-1", 0, "main", predicted["model_version"], label, "She sang.")
    refused = {
        "forged_token": {
            "request_id": "tok-pred-1",
            "index": 0,
            "label": label,
            "token": tokens[0][:-2] + ("AA" if tokens[0][-2:] != "AA" else "BA"),
        },
        "altered_token": {"request_id": "tok-pred-1", "index": 0, "label": label, "token": tokens[1]},  # sentence 1's token for sentence 0
        "expired_token": {"request_id": "tok-pred-1", "index": 0, "label": label, "token": expired},
        "missing_token": {"request_id": "never-predicted", "index": 0, "label": label},
    }
    for reason, body in refused.items():
        answer = other.post("/feedback", json=body)
        assert answer.status_code == 403 and reason.replace("_", " ") in answer.json()["detail"], (reason, answer.json())
    metrics = other.get("/metrics").text
    for reason in refused:
        assert f'mlops_feedback_rejected_total{{reason="{reason}"}} 1.0' in metrics, reason
    stranger = TestClient(signed_app(serving_dir, monkeypatch, key="another-deployment-" + "f" * 32))
    assert stranger.post("/feedback", json={"request_id": "tok-pred-1", "index": 0, "label": label, "token": tokens[0]}).status_code == 403
    # a replay: the same token twice at one instance is a 409; at two instances both are logged, and the evaluation keeps one
    assert one.post("/feedback", json={"request_id": "tok-pred-1", "index": 0, "label": label, "token": tokens[0]}).status_code == 202
    assert one.post("/feedback", json={"request_id": "tok-pred-1", "index": 0, "label": label, "token": tokens[0]}).status_code == 409
    records = [
        {
            "timestamp": t,
            "event": "feedback",
            "status": 202,
            "request_id": f"fb-{t}",
            "prediction_request_id": "tok-pred-1",
            "index": 0,
            "label": label,
        }
        for t in (1.0, 2.0)
    ]
    prediction = {"timestamp": 0.5, "request_id": "tok-pred-1", "index": 0, "label": label, "model_version": predicted["model_version"]}
    joined, counts = join_feedback([prediction], feedback_records(records))
    assert len(joined) == 1 and counts["duplicates"] == 1


def test_signed_feedback_across_two_workers(serving_dir, tmp_path, monkeypatch):
    "`mlops-serve --workers 2`: whichever worker answers the feedback accepts the other's tokens (unsigned, about half would be unverified)."
    from mlops_basics.devtools.test_utils import serve

    monkeypatch.setenv("MLOPS_FEEDBACK_KEY", KEY)
    monkeypatch.setenv("MLOPS_FEEDBACK_BURST", "100")  # each worker has its own rate limit: none of these 13 calls may meet it
    log = tmp_path / "stdout.log"
    with serve("--serving-dir", serving_dir, "--workers", "2", log=log) as url:
        answers = []
        for n in range(12):
            [p] = predict(url, ["The book was read."], f"two-pred-{n}")["predictions"]
            answers.append(
                feedback(url, {"request_id": f"two-pred-{n}", "index": 0, "label": p["label"], "token": p["feedback_token"]}, f"two-fb-{n}")
            )
        forged = feedback(url, {"request_id": "two-pred-0", "index": 0, "label": "acceptable", "token": "e30." + "A" * 43}, "two-fb-forged")
    assert all(status == 202 and body["verified"] and body["agrees"] for status, body in answers), answers
    assert forged[0] == 403
    lines = [l for l in json_lines(log.read_text()) if l.get("event") == "feedback"]
    assert len(lines) == 12 and all(l["predicted"] == l["label"] and len(l["sentence_digest"]) == 32 for l in lines)


def test_signed_feedback_through_the_lambda_handler_after_a_cold_start(serving_dir, monkeypatch):
    monkeypatch.setenv("MLOPS_SERVING_DIR", str(serving_dir))
    monkeypatch.setenv("MLOPS_FEEDBACK_KEY", KEY)
    from mlops_basics.serving import lambda_handler

    lambda_handler._runtime.clear()
    try:
        predicted = lambda_handler.handler({"sentences": ["She sang."]}, None)
        [p] = predicted["predictions"]
        lambda_handler._runtime.clear()  # another instance (a cold start): nothing in memory but the key
        good = {"request_id": predicted["request_id"], "index": 0, "label": p["label"], "token": p["feedback_token"]}
        answer = lambda_handler.handler(good, None)
        assert answer["verified"] is True and answer["agrees"] is True
        assert lambda_handler.handler({**good, "token": None}, None)["statusCode"] == 403
    finally:
        lambda_handler._runtime.clear()


def test_without_a_key_the_app_says_so_and_answers_as_before(serving_dir, monkeypatch, caplog):
    from mlops_basics.serving.app import create_app
    from mlops_basics.serving.settings import ServeSettings

    for name in ("MLOPS_FEEDBACK_KEY", "MLOPS_FEEDBACK_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level("WARNING", logger="mlops_basics.serving.feedback"):
        client = TestClient(create_app(ServeSettings(serving_dir=str(serving_dir))))
    assert "no MLOPS_FEEDBACK_KEY" in caplog.text
    predicted = client.post("/predict", json={"sentences": ["She sang."]}).json()
    assert "feedback_token" not in predicted["predictions"][0]
    assert client.post("/feedback", json={"request_id": predicted["request_id"], "index": 0, "label": "acceptable"}).status_code == 202
    caplog.clear()
    with caplog.at_level("WARNING", logger="mlops_basics.serving.feedback"):
        signed_app(serving_dir, monkeypatch)
    assert "no MLOPS_FEEDBACK_KEY" not in caplog.text


def test_the_key_from_aws_secrets_manager(monkeypatch):
    "MLOPS_FEEDBACK_KEY_SECRET names the secret (the template's FeedbackKeySecretArn); its value holds the keys, newest first."
    import boto3
    from moto import mock_aws

    from mlops_basics.devtools.test_utils import AWS_TEST_CREDENTIALS
    from mlops_basics.serving.feedback import FeedbackSigner, feedback_signer

    for name, value in AWS_TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLOPS_FEEDBACK_KEY", raising=False)
    with mock_aws():
        arn = boto3.client("secretsmanager").create_secret(Name="mlops-feedback-key", SecretString=f"{'n' * 32} {KEY}")["ARN"]
        signer = feedback_signer({"MLOPS_FEEDBACK_KEY_SECRET": arn})
    old = FeedbackSigner([KEY.encode()]).issue("sm-1", 0, "main", "v1", "acceptable", "She sang.")
    assert signer.check(old, "sm-1", 0)[0] == "" and signer.keys[0] == b"n" * 32
