"""Side by side, in one run: the same trained model behind the project's app (`/predict` and the Open Inference Protocol's
`/v2/models/{name}/infer`), behind Seldon's MLServer with the project's runtime (adaptive batching off and on), and behind
the app a user would write first (FastAPI with transformers and PyTorch, written below, not part of the package). The app
runs twice: with `--batching on` (concurrent requests for the model merged into one ONNX Runtime call, without waiting; for
the int8 model this must be asked for, as MLServer's adaptive batching is) and with `--batching off` (one call per request),
so that the table shows what batching is worth.

Every server runs on this machine's cores (2 here, shared with wrk and with anything else running), one at a time, with its
default thread settings; the same client, wrk (one thread, a fixed number of connections), sends the same sentences to each,
one request per sentence (batch 1) and eight sentences per request (batch 8). The whole sequence runs `--rounds` times, so
that load from elsewhere on shared cores falls on every server alike. Recorded per round and as the mean of the rounds:
requests/s and sentences/s, wrk's p50 and p99 latency, the server's CPU time per request over the measured seconds (less
noisy than requests/s on cores shared with wrk) and its resident memory after the load (both of its whole process tree). The
targets compare like with like at batch 1 (`targets`): the app with batching against MLServer with adaptive batching, and
both without it. Writes benchmarks/results/protocol.json (or `--out`); nbs/benchmarks.ipynb draws it. `--servers` runs some of them,
for a short look: the committed results come from a full run on a quiet machine.

    make install && make mlserver        # .venv (the app, torch for the naive app) and .venv-mlserver
    python benchmarks/protocol_benchmark.py [--serving-dir artifacts/serving] [--model-dir artifacts/model] [--duration 15] [--rounds 3]
    python benchmarks/protocol_benchmark.py --duration 5 --rounds 1 --servers app,app-no-batching --out /tmp/protocol.json  # a short look
"""

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from serving_benchmark import (  # noqa: E402  (same wrk parsing as the serving benchmark)
    SENTENCES,  # the same eight sentences in every serving benchmark
    cpu_model,
    parse_wrk,
    run_wrk,
    wrk_version,
)

from mlops_basics.devtools.test_utils import free_port, http, process_stopped, wait_for_http  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "protocol.json"
SCRATCH = ROOT / "benchmarks" / "runs" / "protocol"  # git-ignored
BIN = Path(sys.executable).parent
SERVERS = ("app", "app-no-batching", "mlserver", "mlserver-batching", "naive")
NAIVE_APP = '''"""The serving app a user writes first: FastAPI, transformers and PyTorch, the model run on each request's sentences."""
import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

MODEL_DIR = os.environ["NAIVE_MODEL_DIR"]
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR).eval()
labels = model.config.id2label
app = FastAPI()


class PredictRequest(BaseModel):
    sentences: list[str]


@app.post("/predict")
def predict(request: PredictRequest):
    batch = tokenizer(request.sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**batch).logits.softmax(-1)
    return {"predictions": [{"label": labels[int(p.argmax())], "probabilities": {labels[i]: float(v) for i, v in enumerate(p)}}
                            for p in probabilities]}
'''
LUA = """-- POST {path}, cycling through the bodies
local bodies = {{{bodies}}}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i % #bodies + 1
  return wrk.format(nil, "{path}", nil, bodies[i])
end
"""


def bodies(kind: str, batch: int) -> list[str]:
    "JSON request bodies of `batch` sentences each, cycling through SENTENCES: the app's own API or the protocol's."
    groups = [[SENTENCES[(start + k) % len(SENTENCES)] for k in range(batch)] for start in range(len(SENTENCES))]
    if kind == "predict":
        return [json.dumps({"sentences": g}) for g in groups]
    return [json.dumps({"inputs": [{"name": "text", "shape": [len(g)], "datatype": "BYTES", "data": g}]}) for g in groups]


def process_tree(pid: int) -> list:
    "A process and all its descendants (MLServer's workers, uvicorn's), as psutil processes."
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_rss_mb(pid: int) -> float:
    "Resident memory of a process and all its descendants, MB."
    return round(sum(p.memory_info().rss for p in process_tree(pid)) / 2**20, 1)


def tree_cpu_s(pid: int) -> float:
    "CPU seconds (user and system) a process and all its descendants have used so far."
    return sum(sum(p.cpu_times()[:2]) for p in process_tree(pid))


def load(url: str, path: str, kind: str, batch: int, duration: int, connections: int, work: Path, pid: int) -> dict:
    "wrk against `url``path` with `batch` sentences per request: a short warm-up, then `duration` seconds measured, with server `pid`'s CPU time."
    lua = work / f"{kind}-{batch}.lua"
    lua.write_text(LUA.format(path=path, bodies=", ".join(f"[==[{b}]==]" for b in bodies(kind, batch))))
    run_wrk(url, lua, connections, 3)  # warm-up, not reported
    cpu_before = tree_cpu_s(pid)
    out = run_wrk(url, lua, connections, duration)
    cpu_s = tree_cpu_s(pid) - cpu_before  # the server's own work, less noisy than requests/s on cores it shares with wrk
    result = parse_wrk(out)
    if set(result["latency_ms"]) != {"p50", "p75", "p90", "p99"}:
        raise RuntimeError(f"wrk's latency distribution is missing:\n{out}")
    return {
        "batch": batch,
        "requests_per_s": result["requests_per_s"],
        "sentences_per_s": round(result["requests_per_s"] * batch, 1),
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "requests": result["requests"],
        "cpu_ms_per_request": round(1000 * cpu_s / result["requests"], 2),
        "non_2xx": result["non_2xx"],
        "socket_errors": result["socket_errors"],
    }


def labels_of(url: str, path: str, kind: str) -> list[str]:
    "The labels one request of all SENTENCES gets: each server must agree before it is timed."
    status, _, raw = http("POST", url + path, bodies(kind, len(SENTENCES))[0].encode(), {"Content-Type": "application/json"})
    assert status == 200, raw[:500]
    answer = json.loads(raw)
    return [p["label"] for p in answer["predictions"]] if kind == "predict" else answer["outputs"][0]["data"]


# The targets compare like with like: the app with batching against MLServer with adaptive batching, and both without it.
PAIRS = {
    "batching on": (("app /predict", "app /v2 infer"), "MLServer, adaptive batching"),
    "batching off": (("app /predict, no batching",), "MLServer"),
}
NAIVE = "naive FastAPI + PyTorch"


def targets(results: list[dict]) -> dict:
    "The targets at batch 1 from `results`: each pairing's ratios (requests/s, and CPU per request the other way) and verdict."
    at = {r["server"].split(" (")[0]: r for r in results if r["batch"] == 1}  # "MLServer, adaptive batching (8, 5 ms)" by its kind
    ratio = lambda a, b, key: round(at[a][key] / at[b][key], 2)  # noqa: E731
    versus_framework, cpu, verdicts = {}, {}, {}
    for pairing, (apps, framework) in PAIRS.items():
        apps = [a for a in apps if a in at]
        if framework not in at or not apps:
            verdicts[pairing] = None  # a side not measured: no verdict, not a vacuous pass
            continue
        versus_framework[pairing] = {a: ratio(a, framework, "requests_per_s") for a in apps}
        cpu[pairing] = {a: ratio(framework, a, "cpu_ms_per_request") for a in apps if "cpu_ms_per_request" in at[a]}
        verdicts[pairing] = all(v >= 1 for v in versus_framework[pairing].values())
    apps = [a for apps, _ in PAIRS.values() for a in apps if a in at]
    versus_naive = {a: ratio(a, NAIVE, "requests_per_s") for a in apps} if NAIVE in at else {}
    return {
        "app_over_framework_at_batch_1": versus_framework,  # requests/s of the app over the framework's, each pairing
        "framework_cpu_over_app_at_batch_1": cpu,  # CPU time per request of the framework over the app's: above 1, the app spends less
        "app_at_least_as_fast_as_the_framework_at_batch_1": verdicts,
        "app_over_naive_at_batch_1": versus_naive,
        "app_at_least_5x_the_naive_app_at_batch_1": all(v >= 5 for v in versus_naive.values()) if versus_naive else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving-dir", type=Path, default=ROOT / "artifacts" / "serving", help="the exported model (mlops-export)")
    parser.add_argument(
        "--model-dir", type=Path, default=ROOT / "artifacts" / "model", help="the same model as PyTorch (mlops-train), for the naive app"
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds of load per configuration, batch size and round")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections (requests in flight)")
    parser.add_argument("--batches", default="1,8", help="sentences per request")
    parser.add_argument("--rounds", type=int, default=3, help="times through all servers (the cores are shared: rounds average out others' load)")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"which servers, of {', '.join(SERVERS)}")
    parser.add_argument("--out", type=Path, default=RESULT, help="where to write the results")
    args = parser.parse_args(argv)
    args.serving_dir, args.model_dir = args.serving_dir.resolve(), args.model_dir.resolve()  # the servers start in scratch directories
    chosen = args.servers.split(",")
    if set(chosen) - set(SERVERS):
        parser.error(f"--servers: unknown {sorted(set(chosen) - set(SERVERS))}; choose among {', '.join(SERVERS)}")
    subprocess.run(["make", "-s", "install", "mlserver"], cwd=ROOT, check=True)
    from mlops_basics.serving.mlserver import mlserver_repository
    from mlops_basics.serving.predictor import ONNXPredictor

    predictor = ONNXPredictor(args.serving_dir)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=SCRATCH))
    (work / "naive_app.py").write_text(NAIVE_APP)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def app_server(*options):
        def command(port):
            return [str(BIN / "mlops-serve"), "--serving-dir", str(args.serving_dir), "--port", str(port), *options], "/health"

        return command

    def mlserver(batching):
        def command(port):
            repository = mlserver_repository(
                work / f"mlserver-{batching}",
                args.serving_dir,
                http_port=port,
                grpc_port=free_port(),
                metrics_port=free_port(),
                max_batch_size=args.connections if batching else 0,
                max_batch_time=0.005 if batching else 0.0,
            )
            return [str(ROOT / ".venv-mlserver" / "bin" / "mlserver"), "start", str(repository)], "/v2/models/cola/ready"

        return command

    def naive(port):
        return [str(BIN / "python"), "-m", "uvicorn", "naive_app:app", "--port", str(port), "--no-access-log"], "/docs"

    servers = [  # name, how to start it, its endpoints (name, path, body kind)
        ("app", app_server("--batching", "on"), [("app /predict", "/predict", "predict"), ("app /v2 infer", "/v2/models/main/infer", "v2")]),
        ("app-no-batching", app_server("--batching", "off"), [("app /predict, no batching", "/predict", "predict")]),
        ("mlserver", mlserver(False), [("MLServer", "/v2/models/cola/infer", "v2")]),
        ("mlserver-batching", mlserver(True), [(f"MLServer, adaptive batching ({args.connections}, 5 ms)", "/v2/models/cola/infer", "v2")]),
        ("naive", naive, [("naive FastAPI + PyTorch", "/predict", "predict")]),
    ]
    servers = [s for s in servers if s[0] in chosen]
    reference = [p.label for p in predictor.predict(SENTENCES)]
    runs, started = [], time.time()
    for round_ in range(1, args.rounds + 1):
        for name, start, endpoints in servers:
            port = free_port()
            command, ready_path = start(port)
            log = work / f"{name}-{round_}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, cwd=work, env={**env, "NAIVE_MODEL_DIR": str(args.model_dir.resolve())}
                )
                try:
                    url = f"http://127.0.0.1:{port}"
                    startup = round(wait_for_http(url + ready_path, timeout=180, stopped=process_stopped(proc, log)), 2)
                    for label, path, kind in endpoints:
                        agreement = sum(a == b for a, b in zip(labels_of(url, path, kind), reference)) / len(reference)
                        for batch in map(int, args.batches.split(",")):
                            run = {
                                "round": round_,
                                "server": label,
                                "path": path,
                                "startup_s": startup,
                                "labels_agree_with_onnx": agreement,
                                **load(url, path, kind, batch, args.duration, args.connections, work, proc.pid),
                                "rss_mb": tree_rss_mb(proc.pid),
                            }
                            print(json.dumps(run), flush=True)
                            runs.append(run)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
    results = []  # each server and batch size: the mean over the rounds (the maximum for memory)
    for server, batch in dict.fromkeys((r["server"], r["batch"]) for r in runs):
        rounds = [r for r in runs if (r["server"], r["batch"]) == (server, batch)]
        mean = lambda key: round(sum(r[key] for r in rounds) / len(rounds), 2)  # noqa: B023 (called within this iteration)
        results.append(
            {
                "server": server,
                "path": rounds[0]["path"],
                "batch": batch,
                **{k: mean(k) for k in ("requests_per_s", "sentences_per_s", "p50_ms", "p99_ms", "cpu_ms_per_request")},
                "rss_mb": max(r["rss_mb"] for r in rounds),
                "startup_s": mean("startup_s"),
                "non_2xx": sum(r["non_2xx"] for r in rounds),
                "socket_errors": sum(sum(r["socket_errors"].values()) for r in rounds),
                "labels_agree_with_onnx": min(r["labels_agree_with_onnx"] for r in rounds),
                "requests_per_s_by_round": [r["requests_per_s"] for r in rounds],
            }
        )
    from importlib.metadata import version

    mlserver_versions = json.loads(
        subprocess.run(
            [
                str(ROOT / ".venv-mlserver" / "bin" / "python"),
                "-c",
                "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('mlserver', 'fastapi')}))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    report = {
        "what": "the same model behind the app (/predict and /v2 infer; /predict without batching), MLServer (adaptive batching off and on) and a naive FastAPI + PyTorch app, one after another, driven by wrk",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "wrk": wrk_version(),
            "note": "2 cores shared: wrk runs on the same cores as the server, and other work on the machine may take some of them; compare rows of one run",
        },
        "model": {
            "serving_dir_version": predictor.version,
            "variant": predictor.variant,
            "backbone": (predictor.metadata.get("source") or {}).get("backbone"),
            "naive_app": "the PyTorch checkpoint (fp32) of the same training run, through transformers",
        },
        "client": {
            "tool": "wrk",
            "threads": 1,
            "connections": args.connections,
            "duration_s": args.duration,
            "warm_up_s": 3,
            "rounds": args.rounds,
            "sentences": SENTENCES,
            "body": "one request per group of `batch` consecutive sentences, cycling",
        },
        "servers": {
            "app": "mlops-serve --batching on (no wait, 2 merged calls at once), 1 worker, ONNX Runtime threads: the cores shared among the calls",
            "app-no-batching": "mlops-serve --batching off (a call per request), 1 worker, ONNX Runtime threads: its default",
            "mlserver": "mlserver start, CoLARuntime (inference in a thread, off the event loop), parallel_workers 0, ONNX Runtime threads: its default",
            "naive": "uvicorn naive_app:app, 1 worker, torch threads: its default",
        },
        "versions": {
            **{p: version(p) for p in ("mlops-basics", "onnxruntime", "fastapi", "uvicorn", "torch", "transformers")},
            "mlserver": mlserver_versions["mlserver"],
            "mlserver_fastapi": mlserver_versions["fastapi"],
        },
        "results": results,
        "runs": runs,
        "targets": targets(results),
        "servers_run": [name for name, _, _ in servers],
        "wall_s": round(time.time() - started),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["targets"]))
    return report


if __name__ == "__main__":
    main()
