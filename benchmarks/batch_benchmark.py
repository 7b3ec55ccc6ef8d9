"""Batch scoring: `mlops-score` on corpora of CoLA's training sentences and their synthetic negatives, shuffled and repeated to each size.

For each size (10k, 100k and 1M sentences by default) it runs `mlops-score` in process and records sentences/s and the
process's peak RSS (from wait4); at --ray-sizes it runs the same corpus on a local Ray cluster of one node and of two nodes
(two raylets on this machine: on 2 cores the second node adds overhead, not speed). Targets: peak RSS flat within 10% across
sizes; in process at least 90% of the quantisation benchmark's in-process throughput at the same batch size
(benchmarks/results/quantization.json); Ray on one node at least 85% of in process. Writes benchmarks/results/batch.json
(drawn on nbs/15_batch_scoring.ipynb). Run with nothing else busy:

    python benchmarks/batch_benchmark.py [--serving-dir artifacts/serving] [--sizes 10000 100000 1000000] [--ray-sizes 10000] [--merge]

--merge adds the sizes run now to the recorded runs of the same model (each run is dated), so one size can be re-measured alone.
"""

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from mlops_basics.core.artifacts import read_metadata
from mlops_basics.core.data import load_cola
from mlops_basics.devtools.ray_cluster import local_ray_cluster
from mlops_basics.devtools.test_utils import BIN
from mlops_basics.serving.predictor import model_version
from mlops_basics.training.negatives import synthetic_negatives

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "batch.json"


def corpus_sentences(seed: int = 0) -> list[str]:
    "CoLA's training sentences and as many synthetic negatives as it has acceptable ones."
    train = load_cola().train
    acceptable = [e.sentence for e in train if e.label == 1]
    return [e.sentence for e in train] + [s for s, _ in synthetic_negatives(acceptable, len(acceptable), seed=seed)]


def write_corpus(path: Path, sentences: list[str], size: int, seed: int = 0) -> Path:
    "`size` lines: the sentences shuffled, again and again, one line each."
    rng, written = random.Random(seed), 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            order = sentences[:]
            rng.shuffle(order)
            for s in order[: size - written]:
                f.write(s + "\n")
            written += min(len(order), size - written)
    return path


def run_score(corpus: Path, out: Path, serving_dir: str, batch_size: int, *extra: str) -> dict:
    "One `mlops-score` run: its summary, wall seconds and peak RSS (MiB) from wait4."
    command = [
        str(BIN / "mlops-score"),
        str(corpus),
        str(out),
        "--serving-dir",
        serving_dir,
        "--batch-size",
        str(batch_size),
        "--no-progress",
        *extra,
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()  # communicate reaps the process; its rusage comes from RUSAGE_CHILDREN below
    seconds = time.perf_counter() - started
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"mlops-score failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"summary": json.loads(stdout.strip().splitlines()[-1]), "seconds": round(seconds, 2)}


def measured(corpus: Path, work: Path, serving_dir: str, batch_size: int, mode: str, size: int, *extra: str) -> dict:
    "A run in a fresh Python process that measures its own child's peak RSS (RUSAGE_CHILDREN is per parent)."
    out = work / f"out-{mode}-{size}"
    shutil.rmtree(out, ignore_errors=True)
    probe = (
        "import json, resource, sys; sys.path.insert(0, %r); import batch_benchmark as b; "
        "r = b.run_score(*json.loads(sys.argv[1])); "
        "r['peak_rss_mib'] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1); print(json.dumps(r))"
    ) % str(Path(__file__).parent)
    args = json.dumps([str(corpus), str(out), serving_dir, batch_size, *extra])
    proc = subprocess.run([str(BIN / "python"), "-c", probe, args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = result["summary"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "mode": mode,
        "date": dt.date.today().isoformat(),
        "sentences": size,
        "scored": summary["scored"],
        "sentences_per_s": round(summary["scored"] / result["seconds"], 1),
        "seconds": result["seconds"],
        "peak_rss_mib": result["peak_rss_mib"] if mode == "in process" else None,  # on Ray the work is in the actors, not this process
    }


def merged_runs(recorded: dict, runs: list[dict], model: str) -> list[dict]:
    "The recorded runs this run did not repeat, then this run's, in order of size; only runs of the same model merge."
    if recorded.get("model") != model:
        raise SystemExit(f"--merge: {recorded.get('model')} was recorded, this is {model}; run every size again")
    date = recorded.get("date")
    done = {(r["mode"], r["sentences"]) for r in runs}
    kept = [{"date": date, **r} for r in recorded["runs"] if (r["mode"], r["sentences"]) not in done]
    return sorted(kept + runs, key=lambda r: r["sentences"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving-dir", default="artifacts/serving")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ray-sizes", type=int, nargs="*", default=[10_000])
    parser.add_argument("--batch-size", type=int, default=32, help="as the quantisation benchmark's in-process throughput")
    parser.add_argument("--shard-rows", type=int, default=1000, help="rows per shard: enough shards at 10k for every Ray actor")
    parser.add_argument("--note", default="", help="what was not run, and why")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--merge", action="store_true", help="keep the recorded runs of modes and sizes not run this time")
    args = parser.parse_args()
    metadata = read_metadata(args.serving_dir)
    sentences = corpus_sentences()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for size in args.sizes:
            corpus = write_corpus(work / f"corpus-{size}.txt", sentences, size)
            split = ("--shard-rows", str(args.shard_rows))
            runs.append(measured(corpus, work, args.serving_dir, args.batch_size, "in process", size, *split))
            print(json.dumps(runs[-1]), flush=True)
            if size in args.ray_sizes:
                for nodes, (head_cpus, workers) in {1: (2, 0), 2: (1, 1)}.items():
                    with local_ray_cluster(workers=workers, head_cpus=head_cpus) as cluster:
                        runs.append(
                            measured(
                                corpus,
                                work,
                                args.serving_dir,
                                args.batch_size,
                                f"Ray, {nodes} node{'s' * (nodes > 1)}",
                                size,
                                *split,
                                "--ray",
                                cluster.address,
                                "--actors",
                                "2",
                            )
                        )
                    print(json.dumps(runs[-1]), flush=True)
            corpus.unlink()
    if args.merge and Path(args.out).exists():
        runs = merged_runs(json.loads(Path(args.out).read_text()), runs, model_version(metadata))
    quantization = json.loads((ROOT / "benchmarks" / "results" / "quantization.json").read_text())["models"]["default"]
    method = (
        quantization["variants"].get(quantization.get("int8_method", ""), {})
        if metadata.get("default_variant") == "int8"
        else quantization["variants"]["fp32"]
    )
    reference = method.get("batch32_sentences_per_s")
    in_process = [r for r in runs if r["mode"] == "in process"]
    rss = [r["peak_rss_mib"] for r in in_process]
    one_node = [r for r in runs if r["mode"] == "Ray, 1 node"]
    first = next((r for r in in_process if r["sentences"] == (one_node[0]["sentences"] if one_node else None)), None)
    targets = {
        "rss_flat_within_10pct": {"value": round(max(rss) / min(rss) - 1, 3), "met": max(rss) <= 1.1 * min(rss)} if len(rss) > 1 else None,
        "in_process_vs_quantization_benchmark": {
            "reference_sentences_per_s": reference,
            "value": round(in_process[0]["sentences_per_s"] / reference, 3),
            "target": 0.9,
            "met": in_process[0]["sentences_per_s"] >= 0.9 * reference,
        }
        if reference
        else None,
        "ray_one_node_vs_in_process": {
            "value": round(one_node[0]["sentences_per_s"] / first["sentences_per_s"], 3),
            "target": 0.85,
            "met": one_node[0]["sentences_per_s"] >= 0.85 * first["sentences_per_s"],
        }
        if one_node and first
        else None,
    }
    result = {
        "what": "mlops-score on CoLA's training sentences and their synthetic negatives, shuffled and repeated to each size; one text file per size",
        "model": model_version(metadata),
        "backbone": metadata.get("backbone"),
        "batch_size": args.batch_size,
        "shard_rows": args.shard_rows,
        "machine": {"platform": f"{platform.machine()}", "cpus": os.cpu_count()},
        "date": dt.date.today().isoformat(),
        "runs": runs,
        "targets": targets,
        "note": args.note,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(targets))


if __name__ == "__main__":
    main()
