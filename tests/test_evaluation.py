"""Continuous evaluation from outside: a real `mlops-serve` with two workers gets predictions and users' labels; `mlops-ship --feedback`
joins them by request id; `mlops-monitor evaluate` and the drift report's concept check read the joined rows."""

import json

from test_monitoring import drift, reference  # noqa: F401 (a fixture)
from test_serving import JSON

from mlops_basics.core.data import LABELS, load_cola
from mlops_basics.core.predictions import binary_metrics
from mlops_basics.devtools.test_utils import http, run_cli, serve


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    status, _, answer = http("POST", f"{url}{path}", json.dumps(body).encode(), JSON)
    return status, json.loads(answer)


def test_feedback_is_joined_evaluated_and_read_by_the_concept_check(serving_dir, reference, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLOPS_FEEDBACK_BURST", "1000")  # one test client sends everything: the rate limit is tested in test_feedback
    examples, log = load_cola().validation[:40], tmp_path / "stdout.log"
    truth, predicted = [], []
    with serve("--serving-dir", serving_dir, "--workers", "2", log=log) as url:
        for start in range(0, len(examples), 4):
            batch = examples[start : start + 4]
            status, answer = post(url, "/predict", {"sentences": [ex.sentence for ex in batch]})
            assert status == 200
            for i, (ex, p) in enumerate(zip(batch, answer["predictions"])):
                assert post(url, "/feedback", {"request_id": answer["request_id"], "index": i, "label": LABELS[ex.label]})[0] == 202
                truth.append(ex.label)
                predicted.append(p["label_id"])
        first = answer["request_id"]
        # A second label for the last sentence: refused by the worker that answered it (409), or accepted unverified by the other; the join keeps the first.
        assert post(url, "/feedback", {"request_id": first, "index": 3, "label": LABELS[1 - examples[-1].label]})[0] in (202, 409)
        assert (
            post(url, "/feedback", {"request_id": "never-predicted", "index": 0, "label": "acceptable"})[0] == 202
        )  # unverified, unmatched at the join
    proc = run_cli("mlops-ship", log, "--window", tmp_path / "window.jsonl", "--feedback", tmp_path / "joined.jsonl")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["predictions"] == 40 and stats["labelled"] == 40 and stats["unmatched"] == 1 and stats["feedback"] in (41, 42)
    joined = [json.loads(l) for l in (tmp_path / "joined.jsonl").read_text().splitlines()]
    assert [j["label"] for j in joined if j["request_id"] == first and j["index"] == 3] == [LABELS[examples[-1].label]]
    proc = run_cli(
        "mlops-monitor",
        "evaluate",
        "--feedback",
        tmp_path / "joined.jsonl",
        "--serving-dir",
        serving_dir,
        "--window",
        "200",
        "--out",
        tmp_path / "evaluation.json",
    )
    assert proc.returncode in (0, 1), proc.stderr
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    expected = binary_metrics(truth, predicted)
    assert evaluation["latest"]["n"] == 40 and abs(evaluation["latest"]["accuracy"] - expected["accuracy"]) < 1e-6
    assert abs(evaluation["latest"]["mcc"] - expected["mcc"]) < 1e-6 and evaluation["rolling"][-1]["labelled"] == 40
    wrong = {label: [t != p for t, p in zip(truth, predicted) if t == LABELS.index(label)] for label in LABELS}
    assert evaluation["latest"]["error_rate"] == {k: round(sum(v) / len(v), 6) if v else None for k, v in wrong.items()}
    assert (proc.returncode == 1) == evaluation["agreement_falling"]
    _, summary = drift(serving_dir, reference, tmp_path / "window.jsonl", tmp_path / "drift", "--feedback", tmp_path / "joined.jsonl")
    concept = summary["checks"]["concept.mcc"]
    assert concept["matched"] == 40 and concept["status"] in ("pass", "fail") and abs(concept["accuracy"] - round(expected["accuracy"], 6)) < 1e-6
