"""Measure the behavioural test suite (nbs/11_model_tests.ipynb) on the CPU-trained model.

Exports benchmarks/runs/training_cpu/model (written by train_benchmark.py) with `mlops-export` into
benchmarks/runs/training_cpu/serving (once), runs `mlops-behaviour --no-thresholds` on its default ONNX variant,
and writes benchmarks/results/behaviour.json with the pass rates and the thresholds they justify:

    python benchmarks/behaviour_benchmark.py [--serving-dir DIR]
"""
import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT/"benchmarks"/"runs"/"training_cpu"/"model"
SERVING = ROOT/"benchmarks"/"runs"/"training_cpu"/"serving"
RESULT = ROOT/"benchmarks"/"results"/"behaviour.json"
BIN = Path(sys.executable).parent


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving-dir", type=Path, default=SERVING, help="an existing serving directory (default: export the benchmark model)")
    args = parser.parse_args()
    from mlops_basics.artifacts import package_versions
    from mlops_basics.behaviour import threshold_from
    export_s = None
    if not (args.serving_dir/"metadata.json").exists():
        started = time.perf_counter()
        subprocess.run([str(BIN/"mlops-export"), str(MODEL), str(args.serving_dir)], check=True)
        export_s = round(time.perf_counter() - started, 1)
    report_path = args.serving_dir.parent/"behaviour_report.json"
    started = time.perf_counter()
    subprocess.run([str(BIN/"mlops-behaviour"), "--serving-dir", str(args.serving_dir), "--no-thresholds", "--out", str(report_path)], check=True)
    run_s = round(time.perf_counter() - started, 1)
    report = json.loads(report_path.read_text())
    for r in report["capabilities"].values(): r["threshold"] = threshold_from(r["pass_rate"], r["cases"])
    result = {
        "what": "mlops-behaviour on the CPU-trained model (benchmarks/runs/training_cpu), default ONNX variant",
        "date": dt.date.today().isoformat(),
        "model": report["model"] | {"serving_dir": str(args.serving_dir.relative_to(ROOT)) if args.serving_dir.is_relative_to(ROOT) else str(args.serving_dir)},
        "export_s": export_s, "suite_s": run_s,
        "thresholds_rule": "measured pass rate minus two binomial standard errors (Laplace-smoothed: p = (passed+1)/(cases+2)), rounded down to 0.05",
        "report": {k: v for k, v in report.items() if k != "model"},
        "versions": package_versions(("mlops-basics", "onnxruntime", "tokenizers")),
    }
    RESULT.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    out = main()
    for name, r in out["report"]["capabilities"].items():
        print(f"{name:<17} {r['passed']:>4}/{r['cases']:<4} {r['pass_rate']:.3f} -> threshold {r['threshold']:.2f}")
