"""Benchmark one full `mlops-train` run with the default config on this machine.

Writes benchmarks/results/training_cpu.json: per-epoch validation metrics and time, wall time, samples/s and
peak memory. The docs page nbs/benchmarks.ipynb renders it. Run with nothing else busy:

    python benchmarks/train_benchmark.py [extra Hydra overrides]

or record a default run that already happened on a quiet machine (the DVC pipeline's train stage, `make run`) instead of
training again; its per-epoch times come from the run's own history, and wall time and memory are then unknown:

    python benchmarks/train_benchmark.py --from-run artifacts/model
"""

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ROOT = ROOT / "benchmarks" / "runs" / "training_cpu"
RESULT = ROOT / "benchmarks" / "results" / "training_cpu.json"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def sentences_trained(metadata: dict) -> int:
    "The training sentences a run went through: its optimizer steps times the sentences in each (2 x 70% of an epoch is 1.4 epochs)."
    config = metadata["config"]
    per_step = (
        config["data"]["batch_size"] * config["trainer"]["accumulate_grad_batches"] * config["trainer"]["devices"] * config["trainer"]["num_nodes"]
    )
    return metadata["history"][-1]["step"] * per_step


def main(overrides: list[str]) -> dict:
    from mlops_basics.core.artifacts import package_versions, read_metadata

    if overrides[:1] == ["--from-run"]:
        return record(Path(overrides[1]))
    command = [
        str(Path(sys.executable).parent / "mlops-train"),
        f"paths.root={RUN_ROOT}",
        "training.resume=false",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    metadata = read_metadata(RUN_ROOT / "model")
    history = metadata["history"]
    train_s = history[-1]["elapsed_s"]
    epochs = len(history)
    result = {
        "what": "one mlops-train run with the default config" + (f" and {' '.join(overrides)}" if overrides else ""),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "backbone": metadata["backbone"],
        "epochs": epochs,
        "max_epochs": metadata["config"]["trainer"]["max_epochs"],
        "wall_s": round(wall, 1),
        "train_and_validation_s": train_s,
        "samples_per_s": round(sentences_trained(metadata) / train_s, 1),
        "peak_rss_mb": round(peak_rss_mb),
        "final_metrics": metadata["metrics"],
        "history": history,
        "versions": package_versions(),
    }
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    return result


def record(model_dir: Path) -> dict:
    "The result for a finished default run in `model_dir`, from its metadata."
    from omegaconf import OmegaConf

    from mlops_basics.core.artifacts import package_versions, read_metadata
    from mlops_basics.serving.predictor import model_version
    from mlops_basics.training.config import compose_config
    from mlops_basics.training.train import config_fingerprint

    metadata = read_metadata(model_dir)
    if config_fingerprint(OmegaConf.create(metadata["config"])) != config_fingerprint(compose_config()):  # the same test resuming uses
        raise SystemExit(f"{model_dir} was not trained with the default config")
    history, train_s = metadata["history"], metadata["history"][-1]["elapsed_s"]
    result = {
        "what": f"the default config's run in the DVC pipeline (make run), recorded from {model_dir.name}/metadata.json",
        "date": metadata["created_at"][:10],
        "machine": machine(),
        "backbone": metadata["backbone"],
        "epochs": len(history),
        "max_epochs": metadata["config"]["trainer"]["max_epochs"],
        "wall_s": None,
        "train_and_validation_s": train_s,
        "samples_per_s": round(sentences_trained(metadata) / train_s, 1),
        "peak_rss_mb": None,
        "final_metrics": metadata["metrics"],
        "history": history,
        "config": {g: metadata["config"][g] for g in ("data", "training")},
        "versions": package_versions(),
    }
    served = model_dir.parent / "serving" / "metadata.json"  # the pipeline exports beside the model: the version this run ships as
    if served.exists() and (exported := json.loads(served.read_text())).get("source", {}).get("created_at") == metadata["created_at"]:
        result["model_version"] = model_version(exported)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    r = main(sys.argv[1:])
    print(json.dumps({k: r[k] for k in ("epochs", "wall_s", "samples_per_s", "peak_rss_mb", "final_metrics")}, indent=2))
