"""Where the same seed and config give the same bits, and where they do not.

Trains the tiny model (a few batches of CoLA) with one seed and config several times, changing one thing at a time:
nothing, the torch thread count, `trainer.deterministic`; exports each run to ONNX (fp32 and int8), and exports one run
twice. Records the sha256 of the weights and of each ONNX file, which runs agree bit for bit, and the CPU's kernel
capability (torch picks kernels by it, so another CPU kind rounds differently). Writes
benchmarks/results/reproducibility.json, rendered on nbs/benchmarks.ipynb; tests/test_reproducibility.py checks the
same-machine, same-threads guarantee on every test run.

    python benchmarks/reproducibility_benchmark.py
"""

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serving_benchmark import cpu_model  # noqa: E402

SHARED_COLA = ROOT.parent / "shared" / "data" / "cola"
if "MLOPS_COLA_PATH" not in os.environ and SHARED_COLA.exists():
    os.environ["MLOPS_COLA_PATH"] = str(SHARED_COLA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULT = ROOT / "benchmarks" / "results" / "reproducibility.json"
BIN = Path(sys.executable).parent
TINY = [
    "model=tiny_random",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=20",
]
RUNS = {  # name -> overrides on top of TINY
    "1 thread": ["trainer.num_threads=1"],
    "1 thread, again": ["trainer.num_threads=1"],
    "2 threads": ["trainer.num_threads=2"],
    "1 thread, deterministic": ["trainer.num_threads=1", "trainer.deterministic=true"],
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*command) -> None:
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{command[0]} failed:\n{proc.stderr[-3000:]}")


def findings(same: dict[str, dict[str, bool]]) -> list[str]:
    "What the hashes say, in sentences."
    said = lambda flags: "the same" if all(flags.values()) else "NOT the same" if not any(flags.values()) else f"partly the same ({flags})"
    return [
        f"Same seed, config and thread count, trained again: {said(same['1 thread, again'])} weights and ONNX bytes.",
        f"The same weights exported again: {said(same['1 thread, exported again'])} ONNX bytes (fusions at opt_level 1 are "
        "hardware-independent; dynamic int8 quantisation needs no calibration data).",
        f"Two threads instead of one: {said(same['2 threads'])} weights and ONNX bytes: a thread count splits the sums inside "
        "matrix products differently, so the pipeline pins trainer.num_threads=2 in params.yaml.",
        f"trainer.deterministic=true: {said(same['1 thread, deterministic'])} as without it (torch's CPU kernels for this model "
        "are deterministic already; the flag matters on GPUs).",
        "Across CPU kinds the bits are not expected to match: torch and ONNX Runtime pick kernels by instruction set "
        "(torch_cpu_capability), which round differently; the parity figures (max |delta logit|, int8 agreement) also depend "
        "on ONNX Runtime's thread count.",
    ]


def main() -> None:
    import torch

    hashes = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for i, (name, overrides) in enumerate(RUNS.items()):
            root = work / f"run{i}"
            run(BIN / "mlops-train", *TINY, *overrides, f"paths.root={root}")
            run(BIN / "mlops-export", root / "model", root / "serving")
            hashes[name] = {
                "weights": sha256(root / "model" / "model.safetensors"),
                "onnx_fp32": sha256(root / "serving" / "model.onnx"),
                "onnx_int8": sha256(root / "serving" / "model.int8.onnx"),
            }
        run(BIN / "mlops-export", work / "run0" / "model", work / "again")
        hashes["1 thread, exported again"] = {
            "weights": hashes["1 thread"]["weights"],
            "onnx_fp32": sha256(work / "again" / "model.onnx"),
            "onnx_int8": sha256(work / "again" / "model.int8.onnx"),
        }
    base = hashes["1 thread"]
    same_as_first = {name: {k: h[k] == base[k] for k in base} for name, h in hashes.items() if name != "1 thread"}
    result = {
        "what": "bit-for-bit reproducibility of training (tiny model, 20 batches) and ONNX export, one thing changed at a time",
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "same_as_the_1_thread_run": same_as_first,
        "sha256": hashes,
        "findings": findings(same_as_first),
    }
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"machine": result["machine"], "same_as_the_1_thread_run": same_as_first}, indent=1))


if __name__ == "__main__":
    main()
