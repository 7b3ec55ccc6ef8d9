"""Prometheus for real: promtool checks and unit-tests the alert rules, and a Prometheus server (the Debian package)
scrapes a running `mlops-serve` and answers PromQL with what the test traffic implies."""

import json
import math
import os
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import ROOT
from mlops_basics.devtools.test_utils import BIN, free_port, http, process_stopped, wait_for_http
from mlops_basics.serving.observability import LATENCY_BUCKETS

RULES = ROOT / "monitoring" / "prometheus"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
BUCKETS = (*LATENCY_BUCKETS, math.inf)  # the app's latency buckets, as Prometheus lists them


def promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    assert Path(PROMTOOL).exists(), "promtool is needed (Debian package prometheus): .ci/system-packages installs it"
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_promtool_checks_the_rules_and_the_example_config():
    rules = promtool("check", "rules", RULES / "rules.yml")
    assert rules.returncode == 0 and "SUCCESS" in rules.stdout, rules.stdout + rules.stderr
    assert "19 rules found" in rules.stdout, rules.stdout  # 11 recording rules and 8 alerts
    config = promtool("check", "config", RULES / "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_of_the_alerts_pass():
    result = promtool("test", "rules", RULES / "rules_test.yml")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_the_rule_tests_catch_a_wrong_threshold(tmp_path):
    "The unit tests are not vacuous: a rule with the error threshold raised to 50% fails them."
    shutil.copy(RULES / "rules_test.yml", tmp_path / "rules_test.yml")
    rules = (RULES / "rules.yml").read_text()
    assert "mlops:error_ratio:rate5m > 0.05" in rules
    (tmp_path / "rules.yml").write_text(rules.replace("mlops:error_ratio:rate5m > 0.05", "mlops:error_ratio:rate5m > 0.5"))
    result = promtool("test", "rules", tmp_path / "rules_test.yml")
    assert result.returncode != 0 and "MlopsHighErrorRate" in result.stdout + result.stderr, result.stdout + result.stderr


def test_the_agreement_alert_tests_catch_a_wrong_bound_or_a_missing_minimum(tmp_path):
    "The labelled-agreement tests fail for a bound 0.5 below validation (never fires) and without the 50-label minimum (fires on a handful)."
    shutil.copy(RULES / "rules_test.yml", tmp_path / "rules_test.yml")
    rules = (RULES / "rules.yml").read_text()
    for old, new in (
        ("max by (model) (mlops_model_validation_accuracy) - 0.1)", "max by (model) (mlops_model_validation_accuracy) - 0.5)"),
        ("mlops:feedback_checked:increase1h >= 50", "mlops:feedback_checked:increase1h >= 1"),
    ):
        assert old in rules
        (tmp_path / "rules.yml").write_text(rules.replace(old, new))
        result = promtool("test", "rules", tmp_path / "rules_test.yml")
        assert result.returncode != 0 and "MlopsLabelledAgreementLow" in result.stdout + result.stderr, (new, result.stdout + result.stderr)


def query(prom: str, expr: str, at: float) -> list[dict]:
    "An instant PromQL query at time `at`; the result vector."
    status, _, body = http("GET", f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"}), timeout=10)
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def scalar(prom: str, expr: str, at: float) -> float:
    result = query(prom, expr, at)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    "PromQL's `histogram_quantile` of classic buckets (upper bound -> cumulative count): linear inside the bucket holding the rank."
    bounds = sorted(buckets)
    assert bounds[-1] == math.inf, bounds
    cumulative = [buckets[b] for b in bounds]
    for i in range(1, len(cumulative)):
        cumulative[i] = max(cumulative[i], cumulative[i - 1])  # as Prometheus mends non-monotonic buckets
    rank = q * cumulative[-1]
    b = next(i for i, c in enumerate(cumulative) if c >= rank)
    if b == len(bounds) - 1:
        return bounds[-2]  # in the +Inf bucket: the highest finite bound
    start, below = (0.0, 0.0) if b == 0 else (bounds[b - 1], cumulative[b - 1])
    return start + (bounds[b] - start) * (rank - below) / (cumulative[b] - below)


def test_histogram_quantile_matches_prometheus_documented_examples():
    "The reference implementation the p95 check relies on: rank 0.95 x 20 = 19 falls in (0.005, 0.01], 4 of 5 in."
    assert math.isclose(histogram_quantile(0.95, {0.005: 15, 0.01: 20, math.inf: 20}), 0.005 + 0.005 * 4 / 5)
    assert histogram_quantile(0.5, {0.1: 0, 1.0: 0, math.inf: 4}) == 1.0  # all in +Inf: the highest finite bound
    assert math.isclose(histogram_quantile(0.5, {0.1: 4, math.inf: 4}), 0.05)


def wait_for(predicate, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def served_and_scraped(serving_dir, tmp_path):
    "`mlops-serve` and a Prometheus scraping it every second, both on 127.0.0.1; yields (app URL, Prometheus URL, app log)."
    assert Path(PROMETHEUS).exists(), "prometheus is needed (Debian package prometheus): .ci/system-packages installs it"
    app_port, prom_port = free_port(), free_port()
    app_log = tmp_path / "app.log"
    config = tmp_path / "prometheus.yml"
    shutil.copy(RULES / "rules.yml", tmp_path / "rules.yml")
    config.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: mlops-serve
    static_configs:
      - targets: ["127.0.0.1:{app_port}"]
""")
    processes = []
    try:
        with open(app_log, "wb") as out:
            app = subprocess.Popen(
                [str(BIN / "mlops-serve"), "--serving-dir", str(serving_dir), "--port", str(app_port)],
                stdout=out,
                stderr=subprocess.PIPE,
                env={**os.environ, "MLOPS_THREADS": "1"},
            )
        processes.append(app)
        app_url = f"http://127.0.0.1:{app_port}"
        wait_for_http(f"{app_url}/health", stopped=process_stopped(app))
        with open(tmp_path / "prometheus.log", "wb") as out:
            prom = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        processes.append(prom)
        prom_url = f"http://127.0.0.1:{prom_port}"

        def ready():
            if prom.poll() is not None:
                raise AssertionError((tmp_path / "prometheus.log").read_text()[-3000:])
            try:
                return http("GET", f"{prom_url}/-/ready", timeout=2)[0] == 200
            except OSError:
                return False

        wait_for(ready, "Prometheus to be ready")
        yield app_url, prom_url, app_log
    finally:
        for p in reversed(processes):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_prometheus_scrapes_the_app_and_promql_gives_what_the_traffic_implies(served_and_scraped):
    "Each of `monitoring.PROMQL`'s queries, asked of a live Prometheus, gives what the test's own traffic implies."
    from mlops_basics.ops.monitoring.dashboards import PROMQL, promql

    app, prom, app_log = served_and_scraped
    wait_for(lambda: query(prom, 'up{job="mlops-serve"} == 1', time.time()), "the app's target to be up")
    post = lambda sentences, rid: http(
        "POST", f"{app}/predict", json.dumps({"sentences": sentences}).encode(), {"Content-Type": "application/json", "X-Request-ID": rid}
    )
    # A warm-up request of each outcome (200 and 422) creates the /predict series; once Prometheus has them (and a few
    # more scrapes), the window starts, so every series the queries read has samples from before the traffic.
    assert post(["Warm up."], "warm-up")[0] == 200 and post([], "warm-up-bad")[0] == 422
    series = 'sum(mlops_requests_total{route="/predict"})'
    wait_for(lambda: query(prom, f"{series} == 2", time.time()), "the warm-up requests to be scraped")
    time.sleep(2.5)
    t0 = time.time()
    sentences = [
        "The cat sat on the mat.",
        "Mat the on sat cat the.",
        "She has finished her homework.",
        "Colorless green ideas sleep furiously.",
        "Who do you think that left?",
        "The book was written by John.",
        "John book the written was.",
    ]
    labels, n_requests, n_sentences, n_bad = {}, 40, 0, 5
    for i in range(n_requests):
        batch = [sentences[(i + k) % len(sentences)] for k in range(1 + i % 3)]
        status, _, body = post(batch, f"burst-{i}")
        assert status == 200
        for p in json.loads(body)["predictions"]:
            labels[p["label"]] = labels.get(p["label"], 0) + 1
        n_sentences += len(batch)
    # A few 4xx too: they count as /predict requests, not as predictions, and not as 5xx errors.
    for i in range(n_bad):
        assert post([], f"bad-{i}")[0] == 422
    wait_for(lambda: query(prom, f"{series} == {n_requests + n_bad + 2}", time.time()), "the burst to be scraped")
    time.sleep(2.5)  # a couple more scrapes after the burst
    t1 = time.time()
    window = math.ceil(t1 - t0) + 1  # seconds: from after the warm-up was scraped to after the burst was
    w = f"{window}s"
    logged = [json.loads(l) for l in app_log.read_text().splitlines() if l.startswith("{")]
    burst = [l for l in logged if l.get("request_id", "").startswith(("burst-", "bad-"))]
    predictions = [p for l in burst for p in l.get("predictions", [])]
    assert len(burst) == n_requests + n_bad and len(predictions) == n_sentences
    asked = set()

    def ask(name: str) -> list[dict]:
        asked.add(name)
        return query(prom, promql(name, w), t1)

    # Exact counters.
    assert scalar(prom, 'sum(mlops_requests_total{route="/predict",status="200"})', t1) == n_requests + 1
    assert scalar(prom, 'sum(mlops_model_requests_total{model="main",status="200"})', t1) == n_requests + 1
    assert scalar(prom, 'sum(mlops_requests_total{route="/predict",status="422"})', t1) == n_bad + 1
    assert scalar(prom, "sum(mlops_predictions_total)", t1) == n_sentences + 1

    # Request rate: n requests in the window. rate() divides the increase by the sampled time (the window less
    # at most a scrape interval at each end), so it lies between n/window and n/(window - 2).
    n = n_requests + n_bad
    (rate,) = [float(r["value"][1]) for r in ask("request_rate")]
    assert n / window * 0.97 <= rate <= n / (window - 2) * 1.03, (rate, n, window)
    # No request ended in 5xx, so no 5xx series exists and the error ratio is an empty vector (a 0 on a dashboard).
    assert ask("error_ratio") == []

    # p95 latency, in three steps that hold whatever the timing. (1) The histogram counts exactly what the log
    # records: the raw bucket counters grew, in the window, by the number of logged burst latencies (200s and 422s
    # alike) at or under each bound; the log rounds to 0.01 ms, so a latency that close to a bound may fall either side.
    le_sum = 'sum by (le) ({metric}{{route="/predict"}}{range})'
    bucket = "mlops_request_duration_seconds_bucket"

    def by_le(expr: str, at: float) -> dict[float, float]:
        return {float(r["metric"]["le"]): float(r["value"][1]) for r in query(prom, expr, at)}

    before, after = (by_le(le_sum.format(metric=bucket, range=""), at) for at in (t1 - window, t1))
    latencies = [l["latency_ms"] / 1000 for l in burst]
    assert sorted(after) == list(BUCKETS), after
    for le in BUCKETS:
        surely, maybe = sum(x <= le - 5e-6 for x in latencies), sum(x <= le + 5e-6 for x in latencies)
        assert surely <= after[le] - before[le] <= maybe, (le, after[le] - before[le], surely, maybe)
    # (2) rate() turns those counts into per-second rates, each series extrapolated towards the window's ends by up
    # to a scrape interval (as for the request rate above), so count/window <= rate <= count/(window - 2).
    rates = by_le(le_sum.format(metric=f"rate({bucket}", range=f"[{w}])"), t1)
    for le in BUCKETS:
        count = after[le] - before[le]
        assert count / window * 0.97 <= rates[le] <= count / (window - 2) * 1.03 + 1e-12, (le, rates[le], count, window)
    # (3) The module's p95 is the 0.95-quantile of exactly that rate vector, interpolated as Prometheus documents it.
    (p95,) = [float(r["value"][1]) for r in ask("p95_latency_s")]
    expected_p95 = histogram_quantile(0.95, rates)
    assert math.isclose(p95, expected_p95, rel_tol=1e-9), (p95, expected_p95, rates)

    # Ratios of two series' rates. rate() extrapolates each series towards the window's start by up to 1.1 scrape
    # intervals, less for a series that would reach zero sooner, so two series can be scaled apart by up to
    # 1.1 s in the (window - 2) s sampled.
    slack = 1.1 / (window - 2)
    share = {r["metric"]["label"]: float(r["value"][1]) for r in ask("label_share")}
    expected = {label: labels.get(label, 0) / n_sentences for label in ("acceptable", "unacceptable")}
    assert share.keys() == expected.keys() and all(abs(share[k] - expected[k]) <= slack for k in expected), (share, expected)
    (mean_score,) = [float(r["value"][1]) for r in ask("mean_score")]
    expected_score = sum(p["p_acceptable"] for p in predictions) / n_sentences
    assert abs(mean_score - expected_score) <= slack * expected_score + 1e-6, (mean_score, expected_score)
    (oov,) = [float(r["value"][1]) for r in ask("oov_rate")]
    expected_oov = sum(p["unknown"] for p in predictions) / sum(p["tokens"] for p in predictions)
    assert abs(oov - expected_oov) <= slack * expected_oov + 1e-9, (oov, expected_oov)
    assert asked == set(PROMQL)  # every query the module offers was checked

    # The shipped rules are loaded and evaluated by the live server too.
    rules = json.loads(http("GET", f"{prom}/api/v1/rules")[2])["data"]["groups"]
    assert {g["name"] for g in rules} == {"mlops-recording", "mlops-alerts"}
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), [(r["name"], r.get("lastError")) for g in rules for r in g["rules"]]
