"""Benchmark PyTorch eager against the ONNX variants (raw export, optimised, int8) on the trained model.

Batch-1 latency (p50/p99 over 600 validation sentences) and batch-32 throughput (all 1043 validation sentences)
at 1 and 2 threads; cold start (new process -> first prediction) of the torch and ONNX paths; and the installed
size of the serve extra in a fresh virtual environment. Writes benchmarks/results/onnx.json (rendered by
nbs/benchmarks.ipynb). Run on an otherwise idle machine, after `benchmarks/train_benchmark.py`:

    python benchmarks/onnx_benchmark.py [MODEL_DIR [SERVING_DIR]]

SERVING_DIR: the model's own export (`make bench` passes artifacts/model artifacts/serving); without it, the model is exported
again under benchmarks/runs/.
"""

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"
RESULT = ROOT / "benchmarks" / "results" / "onnx.json"
N_LATENCY, BATCH = 600, 32


def percentile(values, q):
    return float(np.percentile(np.asarray(values) * 1000, q))


def timed(fn, sentences, batch_size):
    "Seconds per call of `fn` on consecutive batches of `sentences`."
    times = []
    for i in range(0, len(sentences), batch_size):
        batch = sentences[i : i + batch_size]
        started = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - started)
    return times


def cold_start(code: str, repeats: int = 3) -> float:
    "Median seconds from starting a new Python process to its first prediction (the process exits right after)."
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def serve_install_size(extras: str) -> float:
    "MB of a fresh virtual environment holding only the wheel with `extras`."
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"), str(ROOT)], check=True
        )
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")], check=True)
        wheel = next((work / "dist").glob("*.whl"))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(work / "venv" / "bin" / "python"),
                "install",
                "-q",
                "-c",
                str(ROOT / "constraints.txt"),
                f"{wheel}[{extras}]",
            ],
            check=True,
        )
        return sum(f.stat().st_size for f in (work / "venv").rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def main(model_dir: Path, serving: Path | None = None) -> dict:
    import onnxruntime as ort
    import torch

    from mlops_basics.core.data import load_cola
    from mlops_basics.serving.predictor import ONNXPredictor, model_version
    from mlops_basics.training.export import export_onnx, export_serving, load_for_export
    from mlops_basics.training.inference import Predictor

    if serving is None:  # no serving directory given: export one from the model
        serving = RUNS / "onnx_benchmark" / "serving"
        export_serving(model_dir, serving)
    meta = json.loads((serving / "metadata.json").read_text())
    versions = {v: model_version(meta, v) for v in meta["variants"]}
    model, tokenizer, _ = load_for_export(model_dir)
    (RUNS / "onnx_benchmark").mkdir(parents=True, exist_ok=True)
    raw = export_onnx(model, tokenizer, RUNS / "onnx_benchmark" / "raw.onnx")
    sentences = [e.sentence for e in load_cola().validation]
    lengths = [len(tokenizer(s)["input_ids"]) for s in sentences]
    results = {
        "what": f"PyTorch eager vs ONNX Runtime on the trained {meta['source']['backbone']} (CoLA validation sentences)",
        "date": dt.date.today().isoformat(),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "model_dir": str(model_dir.relative_to(ROOT)) if model_dir.is_relative_to(ROOT) else str(model_dir),
        "model": {"version": versions[meta["default_variant"]], "backbone": meta["source"]["backbone"], "variant_versions": versions},
        "tokens_per_sentence": {"mean": float(np.mean(lengths)), "p50": float(np.median(lengths)), "max": int(max(lengths))},
        "variants": {
            v: {k: meta["variants"][v][k] for k in ("bytes", "metrics", "max_abs_logit_diff", "agreement_with_pytorch")} for v in meta["variants"]
        },
        "int8_vs_fp32": {"agreement": meta["variants"]["int8"]["agreement_with_fp32"], "mcc_change": meta["variants"]["int8"]["mcc_change_vs_fp32"]},
        "default_variant": meta["default_variant"],
        "speed": {},
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch_predictor = Predictor(model_dir, batch_size=BATCH)
        engines = {"pytorch": torch_predictor.logits}
        for name, path in (("onnx_raw", raw), ("onnx_optimized", serving / "model.onnx"), ("onnx_int8", serving / "model.int8.onnx")):
            variant = {"onnx_optimized": "fp32", "onnx_int8": "int8"}.get(name)
            if variant:
                predictor = ONNXPredictor(serving, variant=variant, threads=threads, batch_size=BATCH)
            else:  # the raw export is no serving variant: same predictor, its session swapped for the unoptimised graph
                predictor = ONNXPredictor(serving, variant="fp32", threads=threads, batch_size=BATCH)
                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
                predictor.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            engines[name] = predictor.logits
        for name, fn in engines.items():
            for s in sentences[:20]:
                fn([s])  # warm-up
            single = timed(fn, sentences[:N_LATENCY], 1)
            batched = timed(fn, sentences, BATCH)
            results["speed"][f"{name}@{threads}"] = {
                "threads": threads,
                "engine": name,
                "batch1_p50_ms": percentile(single, 50),
                "batch1_p99_ms": percentile(single, 99),
                "batch32_sentences_per_s": len(sentences) / sum(batched),
            }
            print(name, threads, {k: round(v, 2) for k, v in results["speed"][f"{name}@{threads}"].items() if isinstance(v, float)}, flush=True)
    for threads in (1, 2):
        base = results["speed"][f"pytorch@{threads}"]["batch1_p50_ms"]
        for name in ("onnx_raw", "onnx_optimized", "onnx_int8"):
            results["speed"][f"{name}@{threads}"]["batch1_speedup_vs_pytorch"] = base / results["speed"][f"{name}@{threads}"]["batch1_p50_ms"]
    results["cold_start_s"] = {
        "onnx": cold_start(f"from mlops_basics.serving.predictor import ONNXPredictor; ONNXPredictor({str(serving)!r}).predict(['It works.'])"),
        "pytorch": cold_start(f"from mlops_basics.training.inference import Predictor; Predictor({str(model_dir)!r}).predict(['It works.'])"),
    }
    results["serve_install_mb"] = {"serve": serve_install_size("serve"), "serve,lambda": serve_install_size("serve,lambda")}
    from mlops_basics.core.artifacts import package_versions

    results["versions"] = package_versions()
    RESULT.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    model = Path(sys.argv[1]) if len(sys.argv) > 1 else RUNS / "training_cpu" / "model"
    r = main(model.resolve(), Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None)
    print(json.dumps({k: r[k] for k in ("cold_start_s", "serve_install_mb", "int8_vs_fp32", "default_variant")}, indent=2))
