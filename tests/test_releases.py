"""Releases: canary and blue/green through a Lambda alias on a moto server (routing config, promotion and rollback
decided from supplied metrics), and the app's sticky A/B split with per-model metrics over real HTTP."""

import io
import json
import time
import zipfile

import pytest

from mlops_basics.devtools.test_utils import free_port, http, run_cli, serve
from mlops_basics.ops.release.traffic import AliasState, CanaryPolicy, LambdaRelease, VariantMetrics, ab_compare, decide, run_canary, variant_metrics


def package(tag: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("handler.py", f"def handler(event, context):\n    return {tag!r}\n")
    return buffer.getvalue()


@pytest.fixture
def release(moto_server):
    "A function on the moto server with versions 1 and 2 published and the alias `live` on 1."
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_server, region_name="eu-west-1")
    name = f"mlops-{time.time_ns()}"
    role = iam.create_role(
        RoleName=name,
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}],
            }
        ),
    )["Role"]["Arn"]
    lam = boto3.client("lambda", endpoint_url=moto_server, region_name="eu-west-1")
    lam.create_function(FunctionName=name, Runtime="python3.12", Role=role, Handler="handler.handler", Code={"ZipFile": package("v0")})
    r = LambdaRelease(lam, name)
    v1 = r.publish(package("v1"), description="model v1")
    r.point(v1)
    v2 = r.publish(package("v2"), description="model v2")
    return r, lam, v1, v2


def alias(lam, r):
    return lam.get_alias(FunctionName=r.function, Name=r.alias)


def test_canary_weight_is_the_alias_routing_config(release):
    r, lam, v1, v2 = release
    assert (v1, v2) == ("1", "2")
    assert r.set_canary(v2, 0.1) == AliasState(v1, v2, 0.1)
    assert alias(lam, r)["FunctionVersion"] == v1 and alias(lam, r)["RoutingConfig"] == {"AdditionalVersionWeights": {v2: 0.1}}
    r.set_canary(v2, 0.5)
    assert alias(lam, r)["RoutingConfig"]["AdditionalVersionWeights"] == {v2: 0.5}
    assert r.rollback() == AliasState(v1) and not (alias(lam, r).get("RoutingConfig") or {}).get("AdditionalVersionWeights")
    with pytest.raises(ValueError, match="between 0 and 1"):
        r.set_canary(v2, 0)
    versions = [v["Version"] for v in lam.list_versions_by_function(FunctionName=r.function)["Versions"]]
    assert versions == ["$LATEST", "1", "2"]


def test_a_healthy_canary_is_promoted_step_by_step(release):
    r, lam, v1, v2 = release
    seen = []

    def metrics(canary, stable, weight):
        assert alias(lam, r)["RoutingConfig"]["AdditionalVersionWeights"] == {canary: weight}  # the weight is live while measuring
        seen.append(weight)
        n = int(1000 * weight)
        return VariantMetrics(n, n // 500, 120.0), VariantMetrics(1000 - n, (1000 - n) // 200, 110.0)

    result = run_canary(r, v2, metrics, CanaryPolicy(steps=(0.1, 0.25, 0.5), min_requests=100), pause=lambda: None)
    assert result.outcome == "promoted" and seen == [0.1, 0.25, 0.5]
    assert alias(lam, r)["FunctionVersion"] == v2 and result.state == AliasState(v2)


def test_a_canary_with_errors_is_rolled_back_at_once(release):
    r, lam, v1, v2 = release
    looks = []

    def metrics(canary, stable, weight):
        looks.append(weight)
        return VariantMetrics(300, 15, 120.0), VariantMetrics(2700, 5, 110.0)  # 5% errors against 0.2%

    result = run_canary(r, v2, metrics, pause=lambda: None)
    assert result.outcome == "rolled back" and looks == [0.1]
    assert "error rate 5.00% over 300 requests is above 2.00%" in result.history[-1]["reasons"]
    assert alias(lam, r)["FunctionVersion"] == v1 and result.state == AliasState(v1)


def test_a_slow_canary_is_rolled_back_after_waiting_for_traffic(release):
    r, lam, v1, v2 = release
    counts = iter([50, 120, 250])
    pauses = []
    result = run_canary(
        r, v2, lambda c, s, w: (VariantMetrics(next(counts), 0, 700.0), VariantMetrics(2000, 0, 100.0)), pause=lambda: pauses.append(1)
    )
    assert [h["action"] for h in result.history] == ["wait", "wait", "rollback"] and len(pauses) == 2
    assert result.history[-1]["reasons"] == ["p95 latency 700 ms is above 500 ms"]
    assert result.state == AliasState(v1)


def test_no_pause_after_the_last_look(release):
    r, lam, v1, v2 = release
    pauses = []
    result = run_canary(
        r, v2, lambda c, s, w: (VariantMetrics(0, 0), VariantMetrics(0, 0)), CanaryPolicy(max_polls=3), pause=lambda: pauses.append(1)
    )
    assert result.outcome == "rolled back" and [h["look"] for h in result.history] == [0, 1, 2, 3]
    assert len(pauses) == 2  # between the three looks, and none before giving up


def test_an_error_while_measuring_rolls_the_canary_back_and_is_raised(release):
    r, lam, v1, v2 = release

    def metrics(canary, stable, weight):
        assert alias(lam, r)["RoutingConfig"]["AdditionalVersionWeights"] == {canary: weight}
        if weight == 0.5:
            raise ConnectionError("CloudWatch did not answer")  # the second step, half the traffic on the canary
        return VariantMetrics(400, 0, 100.0), VariantMetrics(3600, 0, 100.0)

    with pytest.raises(ConnectionError, match="CloudWatch did not answer"):
        run_canary(r, v2, metrics, pause=lambda: None)
    assert alias(lam, r)["FunctionVersion"] == v1 and not (alias(lam, r).get("RoutingConfig") or {}).get("AdditionalVersionWeights")


def test_an_interrupted_wait_rolls_the_canary_back(release):
    r, lam, v1, v2 = release

    def pause():
        raise KeyboardInterrupt  # Ctrl-C, or the CI job cancelled, while waiting for traffic

    with pytest.raises(KeyboardInterrupt):
        run_canary(r, v2, lambda c, s, w: (VariantMetrics(10, 0), VariantMetrics(90, 0)), pause=pause)
    assert r.state() == AliasState(v1) and alias(lam, r)["FunctionVersion"] == v1


def test_set_canary_reads_the_alias_once_and_writes_it_once(release):
    r, lam, v1, v2 = release
    calls = []

    def count(event_name, **kwargs):
        calls.append(event_name.rsplit(".", 1)[-1])

    lam.meta.events.register("before-call.lambda.*", count)
    try:
        state = r.set_canary(v2, 0.25)
    finally:
        lam.meta.events.unregister("before-call.lambda.*", count)
    assert state == AliasState(v1, v2, 0.25) == r.state()
    assert calls.count("UpdateAlias") == 1 and calls.count("GetAlias") <= 2  # the stable version, and point_alias's own check


def test_blue_green_is_a_full_switch_and_back(release):
    r, lam, v1, v2 = release
    assert r.switch(v2) == AliasState(v2)
    assert alias(lam, r)["FunctionVersion"] == v2
    assert r.switch(v1) == AliasState(v1)


@pytest.mark.parametrize(
    "canary, stable, action",
    [
        (VariantMetrics(1000, 5, 100.0), VariantMetrics(9000, 40, 100.0), "promote"),
        (VariantMetrics(1000, 25, 100.0), VariantMetrics(9000, 40, 100.0), "rollback"),  # 2.5% > 2%
        (VariantMetrics(1000, 12, 100.0), VariantMetrics(9000, 9, 100.0), "rollback"),  # 1.2% vs 0.1%: +1.1 points
        (VariantMetrics(1000, 0, 140.0), VariantMetrics(9000, 0, 100.0), "promote"),  # 1.4× is within 1.5×
        (VariantMetrics(1000, 0, 160.0), VariantMetrics(9000, 0, 100.0), "rollback"),  # 1.6×
        (VariantMetrics(100, 0, 100.0), VariantMetrics(900, 0, 100.0), "wait"),
        (VariantMetrics(100, 5, 100.0), VariantMetrics(900, 0, 100.0), "rollback"),  # 5 errors > 2% of 200 already
    ],
)
def test_decisions_from_supplied_metrics(canary, stable, action):
    assert decide(canary, stable, CanaryPolicy()).action == action


def test_ab_compare():
    assert ab_compare(700, 1000, 745, 1000)["winner"] == "b"
    assert ab_compare(745, 1000, 700, 1000)["winner"] == "a"
    assert ab_compare(70, 100, 74, 100)["winner"] is None


@pytest.fixture(scope="module")
def ab_server(serving_dir, tmp_path_factory):
    "`mlops-serve` with two models (fp32 as a, int8 as b), a live, split 50/50; yields (URL, stdout log)."
    log = tmp_path_factory.mktemp("ab") / "stdout.log"
    with serve("--model", f"a={serving_dir}@fp32", "--model", f"b={serving_dir}@int8", "--live", "a", "--ab-split", "a=50,b=50", log=log) as url:
        yield url, log


def predict(url, body, headers=None):
    status, h, answer = http("POST", f"{url}/predict", json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})})
    return status, h, json.loads(answer)


def test_ab_split_is_sticky_per_user_with_metrics_per_model(ab_server):
    url, log = ab_server
    from mlops_basics.serving.settings import sticky_assignment

    health = json.loads(http("GET", f"{url}/health")[2])
    assert health["live"] == "a" and set(health["models"]) == {"a", "b"} and health["ab_split"] == {"a": 0.5, "b": 0.5}
    assert (health["models"]["a"]["variant"], health["models"]["b"]["variant"]) == ("fp32", "int8")
    before = http("GET", f"{url}/metrics")[2].decode()
    start = {m: variant_metrics(before, m).requests for m in ("a", "b")}
    users = [f"user-{i}" for i in range(60)]
    got = {}
    for u in users * 2:  # every user twice
        status, headers, answer = predict(url, {"sentences": ["The cat sat on the mat."]}, {"X-User-ID": u, "X-Request-ID": f"ab-{u}-{len(got)}"})
        assert status == 200 and headers["x-model"] == answer["model"]
        assert got.setdefault(u, answer["model"]) == answer["model"]  # sticky
    assert got == {u: sticky_assignment(u, {"a": 0.5, "b": 0.5}) for u in users}
    assert set(got.values()) == {"a", "b"}
    assert predict(url, {"sentences": ["Hi."]})[2]["model"] == "a"  # no user id: the live model
    assert predict(url, {"sentences": ["Hi."], "model": "b"}, {"X-User-ID": "user-0"})[2]["model"] == "b"  # named beats the split
    assert predict(url, {"sentences": ["Hi."], "model": health["models"]["b"]["version"]})[2]["model"] == "b"
    status, _, answer = predict(url, {"sentences": ["Hi."], "model": "c"})
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "model"]
    after = http("GET", f"{url}/metrics")[2].decode()
    per_model = {m: variant_metrics(after, m) for m in ("a", "b")}
    expected = {m: 2 * sum(v == m for v in got.values()) for m in ("a", "b")}
    expected["a"] += 1
    expected["b"] += 2
    assert {m: per_model[m].requests - start[m] for m in ("a", "b")} == expected
    assert all(v.errors == 0 and v.p95_ms is not None and v.p95_ms > 0 for v in per_model.values())
    assert 'mlops_model_ab_share{model="b"} 0.5' in after
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.startswith("{")]
    ab_lines = [l for l in lines if l.get("request_id", "").startswith("ab-")]
    assert len(ab_lines) == 120 and all(l["assigned"] == "ab" and l["model"] == got[l["request_id"].rsplit("-", 1)[0][3:]] for l in ab_lines)
    assert all(l["model_version"] == health["models"][l["model"]]["version"] for l in ab_lines)


def test_single_model_log_lines_stay_compatible_and_name_the_model(server):
    url, log = server
    status, _, answer = predict(url, {"sentences": ["She sang."]}, {"X-Request-ID": "compat-1"})
    assert status == 200 and answer["model"] == "main"
    line = next(json.loads(l) for l in log.read_text().splitlines() if '"compat-1"' in l)
    assert {"timestamp", "event", "request_id", "method", "path", "status", "latency_ms", "model_version", "variant", "n", "predictions"} <= set(line)
    assert (line["model"], line["assigned"]) == ("main", "live")


def test_lambda_handler_serves_several_models(serving_dir, monkeypatch):
    monkeypatch.setenv("MLOPS_MODELS", f"a={serving_dir}@fp32,b={serving_dir}@int8")
    monkeypatch.setenv("MLOPS_LIVE_MODEL", "b")
    from mlops_basics.serving import lambda_handler

    lambda_handler._runtime.clear()
    try:
        assert lambda_handler.handler({"sentence": "Hi there."}, None)["model"] == "b"
        assert lambda_handler.handler({"sentences": ["Hi there."], "model": "a"}, None)["model"] == "a"
        assert lambda_handler.handler({"sentences": ["Hi."], "model": "zzz"}, None)["statusCode"] == 422
    finally:
        lambda_handler._runtime.clear()


def test_serve_refuses_bad_model_lists(serving_dir):
    bad = run_cli("mlops-serve", "--model", f"a={serving_dir}", "--ab-split", "a=1,z=1", "--port", str(free_port()), timeout=60)
    assert bad.returncode == 2 and "'z' is not one of the models" in bad.stderr
    missing = run_cli("mlops-serve", "--model", f"a={serving_dir}", "--model", f"b={serving_dir}/nothing", "--port", str(free_port()), timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
