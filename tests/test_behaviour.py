"""Behavioural tests: the suite runs on the tiny trained model with the ONNX predictor (mechanics, exit codes), and
the shipped thresholds follow from the recorded measurement of the real trained model."""
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT
from mlops_basics.test_utils import run_cli


def test_suite_reports_every_capability_on_the_tiny_model(serving_dir, tmp_path):
    proc = run_cli("mlops-behaviour", "--serving-dir", serving_dir, "--no-thresholds", "--out", tmp_path/"report.json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path/"report.json").read_text())
    from mlops_basics.behaviour import CAPABILITIES, build_suite
    suite = build_suite()
    assert set(report["capabilities"]) == set(CAPABILITIES)
    for name, r in report["capabilities"].items():
        assert r["cases"] == len(suite[name]) > 0 and 0 <= r["passed"] <= r["cases"] and r["threshold"] is None and r["ok"] is None
        assert abs(r["pass_rate"] - r["passed"] / r["cases"]) < 1e-4
    assert report["model"]["variant"] in ("fp32", "int8")
    # Every distinct sentence was predicted once, and the failures shown are failures by the P(acceptable) they record.
    assert report["sentences"] == len({s for cases in suite.values() for c in cases for s in c.get("sentences", [c.get("sentence")])})
    for name, r in report["capabilities"].items():
        assert len(r["failures"]) == min(3, r["cases"] - r["passed"]), name
        for f in r["failures"]:
            p = f["p_acceptable"]
            if f["kind"] == "higher": assert p[0] <= p[1], (name, f)
            elif f["kind"] == "label": assert p[0] <= 0.5 if f["expect"] == "acceptable" else p[0] >= 0.5, (name, f)  # rounded to 4 places
            else: assert f["kind"] == "same" and len(p) == len(f["sentences"]) >= 2, (name, f)


def test_the_suite_has_three_kinds_of_case(serving_dir):
    "label, higher (first above second: pairs and word order alike) and same; anything else is refused by name."
    from mlops_basics.behaviour import build_suite, run_suite
    from mlops_basics.predictor import ONNXPredictor
    suite = build_suite()
    assert {c["kind"] for cases in suite.values() for c in cases} == {"label", "higher", "same"}
    assert all(c["kind"] == "higher" for c in suite["dir_word_order"] + suite["mft_pairs"])
    predictor = ONNXPredictor(serving_dir)
    report = run_suite(predictor, {"dir_word_order": suite["dir_word_order"]})["capabilities"]["dir_word_order"]
    sentences = sorted({s for c in suite["dir_word_order"] for s in c["sentences"]})
    predicted = {s: p.probabilities["acceptable"] for s, p in zip(sentences, predictor.predict(sentences))}
    assert report["passed"] == sum(predicted[c["sentences"][0]] > predicted[c["sentences"][1]] for c in suite["dir_word_order"])
    with pytest.raises(ValueError, match="unknown test kind 'lower'"):
        run_suite(predictor, {"dir_word_order": [{"kind": "lower", "sentences": ["The cat sat.", "Sat cat the."]}]})


def test_thresholds_decide_the_exit_code(serving_dir, tmp_path):
    from mlops_basics.behaviour import CAPABILITIES
    (tmp_path/"zero.json").write_text(json.dumps({name: 0.0 for name in CAPABILITIES}))
    assert run_cli("mlops-behaviour", "--serving-dir", serving_dir, "--thresholds", tmp_path/"zero.json").returncode == 0
    (tmp_path/"impossible.json").write_text(json.dumps({"mft_pairs": 1.01, "rob_typos": 1.01}))
    proc = run_cli("mlops-behaviour", "--serving-dir", serving_dir, "--thresholds", tmp_path/"impossible.json", "--out", tmp_path/"r.json")
    assert proc.returncode == 1 and "below threshold: mft_pairs, rob_typos" in proc.stderr
    report = json.loads((tmp_path/"r.json").read_text())
    assert report["below_threshold"] == ["mft_pairs", "rob_typos"] and report["capabilities"]["mft_pairs"]["failures"]
    (tmp_path/"typo.json").write_text(json.dumps({"mft_pair": 0.5}))
    wrong = run_cli("mlops-behaviour", "--serving-dir", serving_dir, "--thresholds", tmp_path/"typo.json")
    assert wrong.returncode == 2 and "unknown capabilities: mft_pair" in wrong.stderr
    assert run_cli("mlops-behaviour", "--serving-dir", tmp_path/"missing").returncode == 2


def test_shipped_thresholds_follow_from_the_recorded_measurement():
    "THRESHOLDS are what the rule gives for benchmarks/results/behaviour.json, and the measured model meets them all."
    from mlops_basics.behaviour import THRESHOLDS, build_suite, threshold_from
    measured = json.loads((ROOT/"benchmarks"/"results"/"behaviour.json").read_text())
    capabilities = measured["report"]["capabilities"]
    assert THRESHOLDS == {name: threshold_from(r["pass_rate"], r["cases"]) for name, r in capabilities.items()}
    # The documented margin, computed here from the counts: two Laplace-smoothed binomial standard errors below the
    # measured rate, rounded down to 0.05 (so within 0.05 of that bound), never below 0.
    for name, r in capabilities.items():
        smoothed = (r["passed"] + 1) / (r["cases"] + 2)
        bound = r["passed"] / r["cases"] - 2 * math.sqrt(smoothed * (1 - smoothed) / r["cases"])
        if bound <= 0: assert THRESHOLDS[name] == 0, name
        else: assert bound - 0.05 - 1e-6 < THRESHOLDS[name] <= bound + 1e-6 and abs(THRESHOLDS[name] / 0.05 - round(THRESHOLDS[name] / 0.05)) < 1e-9, (name, bound)
    assert {name: r["cases"] for name, r in capabilities.items()} == {name: len(cases) for name, cases in build_suite().items()}
    assert measured["model"]["backbone"] == "all-MiniLM-L6-v2"


def test_behaviour_suite_is_torch_free(serving_dir):
    probe = f"""
import json, sys
from mlops_basics.behaviour import run_suite
from mlops_basics.predictor import ONNXPredictor
report = run_suite(ONNXPredictor({str(serving_dir)!r}))
print(json.dumps(sorted({{"torch", "transformers", "lightning", "pytorch_lightning"}} & set(sys.modules))))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
