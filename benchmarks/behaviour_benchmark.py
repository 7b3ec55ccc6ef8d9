"""Measure the behavioural test suite (nbs/11_model_tests.ipynb) on a trained model, and the regression gate it justifies.

Runs `mlops-behaviour --no-thresholds` on a serving directory's default ONNX variant (by default the CPU-trained model of
train_benchmark.py, benchmarks/runs/training_cpu/model, exported with `mlops-export` into benchmarks/runs/training_cpu/serving
once) and writes benchmarks/results/behaviour.json: pass rates, the threshold each justifies (`threshold_from`), and the
quality targets met and missed. `--write-thresholds` also rewrites the notebook's THRESHOLDS cell with those thresholds,
so after retraining one command (then `nbdev_export`) moves the gate:

    python benchmarks/behaviour_benchmark.py --serving-dir artifacts/serving --write-thresholds && nbdev_export
"""

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "benchmarks" / "runs" / "training_cpu" / "model"
SERVING = ROOT / "benchmarks" / "runs" / "training_cpu" / "serving"
RESULT = ROOT / "benchmarks" / "results" / "behaviour.json"
NOTEBOOK = ROOT / "nbs" / "11_model_tests.ipynb"
BIN = Path(sys.executable).parent
THRESHOLDS_CELL = "#| export\nTHRESHOLDS = {"  # how the cell that holds the gate begins


def thresholds_source(thresholds: dict[str, float], width: int = 120) -> str:
    "The notebook cell that defines THRESHOLDS as `thresholds`, a few capabilities per line."
    lines, line = [], "   "
    for name, value in thresholds.items():
        item = f" {json.dumps(name)}: {value!r},"
        if len(line) + len(item) > width:
            lines.append(line)
            line = "   "
        line += item
    lines.append(line)
    return (
        THRESHOLDS_CELL
        + "  # the regression gate: threshold_from(measured pass rate), written by benchmarks/behaviour_benchmark.py --write-thresholds\n"
        + "\n".join(lines)
        + "\n}"
    )


def write_thresholds(thresholds: dict[str, float], notebook: Path = NOTEBOOK) -> None:
    "Replace the source of the notebook's THRESHOLDS cell (and nothing else) with `thresholds`."
    nb = json.loads(notebook.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith(THRESHOLDS_CELL)]
    if len(cells) != 1:
        raise SystemExit(f"{notebook}: expected one cell beginning {THRESHOLDS_CELL!r}, found {len(cells)}")
    lines = thresholds_source(thresholds).split("\n")
    cells[0]["source"] = [line + "\n" for line in lines[:-1]] + lines[-1:]
    notebook.write_text(json.dumps(nb, indent=1, ensure_ascii=False, sort_keys=True) + "\n")  # as nbdev_clean writes it


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving-dir", type=Path, default=SERVING, help="an existing serving directory (default: export the benchmark model)")
    parser.add_argument("--result", type=Path, default=RESULT, help=f"where to write the measurement (default: {RESULT.relative_to(ROOT)})")
    parser.add_argument("--write-thresholds", action="store_true", help="also write the thresholds into the notebook's THRESHOLDS cell")
    parser.add_argument(
        "--notebook", type=Path, default=NOTEBOOK, help=f"the notebook --write-thresholds rewrites (default: {NOTEBOOK.relative_to(ROOT)})"
    )
    args = parser.parse_args()
    from mlops_basics.core.artifacts import package_versions
    from mlops_basics.ops.models.behaviour import threshold_from

    serving_dir = args.serving_dir.resolve()
    export_s = None
    if not (serving_dir / "metadata.json").exists():
        started = time.perf_counter()
        subprocess.run([str(BIN / "mlops-export"), str(MODEL), str(serving_dir)], check=True)
        export_s = round(time.perf_counter() - started, 1)
    report_path = args.result.parent / "behaviour_report.tmp.json"
    started = time.perf_counter()
    try:
        subprocess.run([str(BIN / "mlops-behaviour"), "--serving-dir", str(serving_dir), "--no-thresholds", "--out", str(report_path)], check=True)
        report = json.loads(report_path.read_text())
    finally:
        report_path.unlink(missing_ok=True)
    run_s = round(time.perf_counter() - started, 1)
    for r in report["capabilities"].values():
        r["threshold"] = threshold_from(r["pass_rate"], r["cases"])
        r["ok"] = r["pass_rate"] >= r["threshold"]
    where = str(serving_dir.relative_to(ROOT)) if serving_dir.is_relative_to(ROOT) else serving_dir.name
    result = {
        "what": f"mlops-behaviour on the serving directory {where} (model {report['model']['version']}), default ONNX variant",
        "date": dt.date.today().isoformat(),
        "model": report["model"] | {"serving_dir": where},
        "export_s": export_s,
        "suite_s": run_s,
        "thresholds_rule": "measured pass rate minus two binomial standard errors (Laplace-smoothed: p = (passed+1)/(cases+2)), rounded down to 0.05",
        "targets_rule": "QUALITY_TARGETS of nbs/11_model_tests.ipynb: the pass rate a useful grammar checker reaches; reported, enforced only with --require-targets",
        "report": {k: v for k, v in report.items() if k != "model"},
        "versions": package_versions(("mlops-basics", "onnxruntime", "tokenizers")),
    }
    args.result.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    if args.write_thresholds:
        write_thresholds({name: r["threshold"] for name, r in report["capabilities"].items()}, args.notebook)
    return result


if __name__ == "__main__":
    out = main()
    for name, r in out["report"]["capabilities"].items():
        print(
            f"{name:<21} {r['passed']:>4}/{r['cases']:<4} {r['pass_rate']:.3f} -> threshold {r['threshold']:.2f}, target {r['target']:.2f} "
            f"{'met' if r['meets_target'] else 'missed'}"
        )
    print("targets missed:", ", ".join(out["report"]["missed_targets"]) or "none")
