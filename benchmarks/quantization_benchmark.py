"""Compare the int8 methods of `mlops-export` with fp32 on trained models.

For each serving directory: quantise its fp32 graph with each method (`static`, calibrated on the first 256 training sentences as
mlops-export does; `dynamic`; `blockwise`: Week 4a), then measure on CoLA's 1043 validation sentences each variant's MCC, how many predictions agree with fp32, the largest logit difference, whether a
sentence's logits stay the same alone and in a batch of 32, the file size, batch-1 latency (p50 over 300 sentences, one
call each) and batch-32 throughput, at 2 ONNX Runtime threads. Writes benchmarks/results/quantization.json (rendered by
nbs/04a_export.ipynb and nbs/benchmarks.ipynb). Run on an otherwise idle machine:

    python benchmarks/quantization_benchmark.py NAME=SERVING_DIR [NAME=SERVING_DIR ...]
"""

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "quantization.json"
N_LATENCY, BATCH, THREADS = 300, 32, 2
PRODUCT_OPS = (
    "MatMul",
    "FusedMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "MatMulNBits",
    "Attention",
    "QAttention",
)


def measure(path: Path, tokenizer, sentences: list[str]) -> tuple[np.ndarray, dict]:
    "Validation logits (batches of 32) and speed of one graph."
    import onnxruntime as ort

    from mlops_basics.serving.predictor import encode_batch
    from mlops_basics.training.export import runtime_operators

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(batch):
        return session.run(["logits"], {k: v for k, v in encode_batch(tokenizer, batch).items() if k in names})[0]

    for s in sentences[:20]:
        run([s])  # warm up
    started = time.perf_counter()
    logits = np.concatenate([run(sentences[i : i + BATCH]) for i in range(0, len(sentences), BATCH)])
    throughput = len(sentences) / (time.perf_counter() - started)
    alone, times = [], []
    for s in sentences[:N_LATENCY]:
        t = time.perf_counter()
        alone.append(run([s]))
        times.append(time.perf_counter() - t)
    batch_invariance = float(np.abs(np.concatenate(alone) - logits[:N_LATENCY]).max())
    return logits, {
        "bytes": path.stat().st_size,
        "batch1_p50_ms": round(float(np.median(times)) * 1000, 2),
        "batch32_sentences_per_s": round(throughput, 1),
        "max_abs_change_alone_vs_batched": batch_invariance,
        "products_run_as": {op: n for op, n in runtime_operators(path).items() if op in PRODUCT_OPS},  # what ONNX Runtime multiplies with
    }


def compare(serving_dir: Path, sentences: list[str], labels: list[int], train: list[str]) -> dict:
    "fp32 and each int8 method of one serving directory (static calibrated on `train`, as mlops-export does)."
    from mlops_basics.core.artifacts import read_metadata
    from mlops_basics.core.predictions import binary_metrics
    from mlops_basics.serving.predictor import encode_batch, load_tokenizer, model_version
    from mlops_basics.training.export import CALIBRATION_SENTENCES, INT8_METHODS, SERVING_FILES, quantize_int8

    metadata = read_metadata(serving_dir)
    tokenizer = load_tokenizer(serving_dir / "tokenizer.json", metadata["max_length"])
    fp32 = serving_dir / SERVING_FILES["fp32"]
    calibration = [encode_batch(tokenizer, train[i : i + 16]) for i in range(0, CALIBRATION_SENTENCES, 16)]
    reference, speed = measure(fp32, tokenizer, sentences)
    fp32_mcc = binary_metrics(labels, reference.argmax(1))["mcc"]
    variants = {"fp32": {"mcc": round(fp32_mcc, 4), **speed}}
    with tempfile.TemporaryDirectory() as work:
        for method in INT8_METHODS:
            logits, speed = measure(quantize_int8(fp32, Path(work) / f"{method}.onnx", method, calibration), tokenizer, sentences)
            mcc = binary_metrics(labels, logits.argmax(1))["mcc"]
            variants[method] = {
                "mcc": round(mcc, 4),
                "mcc_change_vs_fp32": round(mcc - fp32_mcc, 4),
                "agreement_with_fp32": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 4),
                "max_abs_logit_diff_vs_fp32": round(float(np.abs(logits - reference).max()), 4),
                **speed,
            }
    return {
        "backbone": metadata["source"].get("backbone"),
        "serving_dir": os.path.relpath(serving_dir, ROOT),
        "model_version": model_version(metadata),
        "default_variant": metadata["default_variant"],
        "int8_method": metadata["variants"]["int8"].get("method", "dynamic"),
        "variants": variants,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=SERVING_DIR, e.g. default=artifacts/serving")
    args = parser.parse_args(argv)
    import onnxruntime

    from mlops_basics.core.artifacts import write_json
    from mlops_basics.core.data import load_cola

    splits = load_cola(None)
    sentences, labels = [e.sentence for e in splits.validation], [e.label for e in splits.validation]
    models = {}
    for spec in args.models:
        name, _, directory = spec.partition("=")
        models[name] = compare(Path(directory).resolve(), sentences, labels, [e.sentence for e in splits.train])
        for variant, v in models[name]["variants"].items():
            print(
                f"{name:<20} {variant:<10} MCC {v['mcc']:.4f} agree {v.get('agreement_with_fp32', 1):.4f} {v['bytes'] / 1e6:6.1f} MB "
                f"{v['batch1_p50_ms']:6.2f} ms {v['batch32_sentences_per_s']:7.1f}/s alone-vs-batched {v['max_abs_change_alone_vs_batched']:.2g}",
                flush=True,
            )
    write_json(
        {
            "what": "fp32 against int8 quantised statically (per-column weights, activation ranges calibrated on 256 training sentences), "
            "dynamically (per-column weights, per-tensor activations of each call) and blockwise (weights and each token's activations "
            "per block of 32), on CoLA's validation sentences",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            "threads": THREADS,
            "date": dt.date.today().isoformat(),
            "onnxruntime": onnxruntime.__version__,
            "models": models,
        },
        RESULT,
    )


if __name__ == "__main__":
    main()
