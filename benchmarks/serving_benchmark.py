"""Benchmark the serving image on this machine with a real model (make bench: the one `make run` trained).

Writes benchmarks/results/serving.json: image size and build time; container start to the first successful /predict; the
Lambda handler's cold start (imports + model load, in the image) and warm latency through the Lambda runtime client; HTTP
p50/p99 latency and requests/s for 60 s under wrk (a separate process) with 1 and 2 server workers; peak memory (cgroup).
The docs page nbs/benchmarks.ipynb renders it. Run as root with podman, debootstrap and wrk installed, nothing else busy:

    python benchmarks/serving_benchmark.py [--model artifacts/model --serving-dir artifacts/serving] [--duration 60]
"""

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from mlops_basics.devtools.containers import (
    BASE_IMAGE,
    build_image,
    container_memory_peak_bytes,
    container_peak_rss_bytes,
    ensure_base_image,
    image_exists,
    make_build_context,
    podman,
    publish_args,
    remove_container,
    remove_image,
    run_http_container,
)
from mlops_basics.devtools.lambda_runtime import run_lambda_container
from mlops_basics.devtools.test_utils import free_port, http
from mlops_basics.serving.predictor import model_version

ROOT = Path(__file__).resolve().parents[1]

SHARED_COLA = ROOT.parent / "shared" / "data" / "cola"  # mlops-export validates on CoLA: use the local copy when there is one
if "MLOPS_COLA_PATH" not in os.environ and SHARED_COLA.exists():
    os.environ["MLOPS_COLA_PATH"] = str(SHARED_COLA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULT = ROOT / "benchmarks" / "results" / "serving.json"
SCRATCH = ROOT / "benchmarks" / "runs" / "serving"  # git-ignored
SENTENCES = [
    "The book was read by the student.",
    "Book the the read.",
    "She sang beautifully at the concert last night.",
    "Who do you think that left?",
    "The more you eat, the fatter you get.",
    "John seems that is happy.",
    "The children are playing in the garden.",
    "Mary wondered whether to leave.",
]
LUA = """-- POST /predict with one sentence, cycling through a few
local sentences = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  i = i %% #sentences + 1
  return wrk.format(nil, "/predict", nil, '{"sentences": ["' .. sentences[i] .. '"]}')
end
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine() -> dict:
    version = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "podman": version("podman", "--version"),
        "runc": version("runc", "--version"),
        "wrk": wrk_version(),
        "note": "wrk, the containers and anything else on the machine share its cores",
    }


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return (out.stdout + out.stderr).strip().splitlines()[0]


def percentile(values: list[float], q: float) -> float:
    "The nearest-rank `q`th percentile."
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def export_model(model: Path, out: Path) -> Path:
    "The serving directory of `model` (mlops-export), reused when it was already exported from this very training run."
    trained = json.loads((model / "metadata.json").read_text())
    if (out / "metadata.json").exists():
        source = json.loads((out / "metadata.json").read_text()).get("source") or {}
        if source.get("created_at") == trained.get("created_at") and source.get("model_dir") == str(model):
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "mlops-export"), str(model), str(out)], check=True)
    return out


def start_to_first_predict(tag: str, runs: int) -> list[float]:
    "Seconds from `podman run` to the first 200 of POST /predict, `runs` times."
    body = json.dumps({"sentences": SENTENCES[:1]}).encode()
    times = []
    for _ in range(runs):
        name, port = f"mlops-bench-{uuid.uuid4().hex[:10]}", free_port()
        started = time.perf_counter()
        podman("run", "--detach", "--name", name, *publish_args(port), tag)
        try:
            while True:
                try:
                    if http("POST", f"http://127.0.0.1:{port}/predict", body, {"Content-Type": "application/json"}, timeout=5)[0] == 200:
                        break
                except OSError:
                    pass
                if time.perf_counter() - started > 300:
                    raise TimeoutError("no /predict answer in 300 s")
                time.sleep(0.05)
            times.append(round(time.perf_counter() - started, 3))
        finally:
            remove_container(name)
    return times


def lambda_cold_start_in_image(tag: str, runs: int) -> list[dict]:
    "Imports and model load of the Lambda handler, timed inside the image (a fresh process each run)."
    probe = (
        "import json, statistics, time; t0 = time.perf_counter(); import mlops_basics.serving.lambda_handler as h; t1 = time.perf_counter(); "
        "h.runtime(); t2 = time.perf_counter(); h.handler({'sentence': 'It is cold.'}); t3 = time.perf_counter(); warm = []\n"
        "for i in range(50): s = time.perf_counter(); h.handler({'sentence': f'It is warm {i} times.'}); warm.append(time.perf_counter() - s)\n"
        "print(json.dumps({'import_s': t1 - t0, 'model_load_s': t2 - t1, 'first_event_s': t3 - t2, 'warm_handler_ms_p50': 1000 * statistics.median(warm)}))"
    )
    return [
        {k: round(v, 3) for k, v in json.loads(podman("run", "--rm", tag, "python3", "-c", probe).stdout.strip().splitlines()[-1]).items()}
        for _ in range(runs)
    ]


def lambda_runtime(tag: str, warm_events: int) -> dict:
    "The image under the Lambda runtime client: container start to first answer, then warm invocations (direct events)."
    with run_lambda_container(tag) as (api, name, started):
        first = api.invoke({"sentence": SENTENCES[0]}, container=name)
        assert first.kind == "response", first.payload
        to_first_answer = first.answered - started
        init_s = api.first_poll - started
        warm = []
        for i in range(warm_events):
            answer = api.invoke({"sentence": SENTENCES[i % len(SENTENCES)]}, container=name)
            assert answer.kind == "response", answer.payload
            warm.append(answer.seconds * 1000)
        peak, rss = container_memory_peak_bytes(name), container_peak_rss_bytes(name)
    return {
        "container_start_to_runtime_client_ready_s": round(init_s, 3),
        "first_invocation_s": round(first.seconds, 3),
        "container_start_to_first_response_s": round(to_first_answer, 3),
        "warm_ms": {
            "n": len(warm),
            "p50": round(percentile(warm, 50), 2),
            "p99": round(percentile(warm, 99), 2),
            "mean": round(statistics.mean(warm), 2),
        },
        "peak_memory_mb": round(peak / 2**20) if peak else None,
        "peak_rss_mb": round(rss / 2**20) if rss else None,
    }


def run_wrk(url: str, lua: Path, connections: int, duration: float, warmup: float = 0) -> str:
    "wrk's report of `duration` seconds at `connections` connections with `lua`'s requests, after an unreported `warmup`."
    if warmup:
        subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{warmup}s", "-s", str(lua), url], capture_output=True, check=True)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency", "-s", str(lua), url]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def parse_wrk(output: str) -> dict:
    "Requests/s, latency percentiles (ms) and errors from `wrk --latency` output."

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
        return round(float(number) * {"us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4}[unit], 2)

    latency = {f"p{p}": ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", output, re.M)}  # wrk pads a value in seconds with a space
    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]),
        "latency_ms": latency,
        "requests": int(requests[1]),
        "non_2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()))) if errors else {},
    }


def http_load(tag: str, workers: int, threads: int, duration: int, connections: int, lua: Path) -> dict:
    "wrk against the HTTP server container with `workers` processes of `threads` ONNX Runtime threads each."
    env = ["--env", f"WORKERS={workers}", "--env", f"MLOPS_THREADS={threads}"]
    with run_http_container(tag, *env) as (url, name, healthy_s):
        out = run_wrk(url, lua, connections, duration, warmup=5)
        single = run_wrk(url, lua, 1, max(1, duration // 6))  # one request at a time: latency without queueing
        peak, rss = container_memory_peak_bytes(name), container_peak_rss_bytes(name)
        stats = podman("stats", "--no-stream", "--format", "json", name, check=False).stdout
    result = {
        "workers": workers,
        "onnxruntime_threads": threads or "default",
        "connections": connections,
        "wrk_threads": 1,
        "duration_s": duration,
        **parse_wrk(out),
        "peak_memory_mb": round(peak / 2**20) if peak else None,
        "peak_rss_mb": round(rss / 2**20) if rss else None,
        "start_to_healthy_s": round(healthy_s, 2),
        "one_connection": {k: v for k, v in parse_wrk(single).items() if k in ("requests_per_s", "latency_ms", "non_2xx")},
    }
    try:
        result["memory_at_end"] = json.loads(stats)[0].get("mem_usage")
    except (ValueError, IndexError, KeyError):
        pass
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "benchmarks" / "runs" / "training_cpu" / "model", help="a trained model directory")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load per configuration")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--starts", type=int, default=3, help="container starts to time")
    parser.add_argument("--warm-events", type=int, default=100, help="warm Lambda invocations to time")
    parser.add_argument("--serving-dir", type=Path, help="the model's own export (make bench: artifacts/serving); default: export --model again")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    for tool in ("podman", "wrk"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: run .ci/system-packages")
    info = machine()
    serving = args.serving_dir or export_model(args.model, SCRATCH / "serving")
    metadata = json.loads((serving / "metadata.json").read_text())
    base_cached = image_exists(BASE_IMAGE)
    base = ensure_base_image()
    tag = f"localhost/mlops-basics-bench:{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="mlops-serving-bench-") as tmp:
        context = make_build_context(serving, Path(tmp) / "context")
        lua = Path(tmp) / "predict.lua"
        lua.write_text(LUA % ", ".join(json.dumps(s) for s in SENTENCES))
        started = time.perf_counter()
        build_image(context, tag, base=base)
        build_s = time.perf_counter() - started
        try:
            inspect = lambda image: json.loads(podman("image", "inspect", image).stdout)[0]
            image = {
                "size_mb": round(inspect(tag)["Size"] / 1e6, 1),
                "base_size_mb": round(inspect(base)["Size"] / 1e6, 1),
                "serving_dir_mb": round(sum(p.stat().st_size for p in serving.iterdir()) / 1e6, 1),
                "build_s": round(build_s, 1),
                "base": base,
                "base_was_cached": base_cached,
                "build_note": "a fresh build (no layer cache); pip downloads the serve and lambda extras from PyPI",
            }
            listed = json.loads(podman("run", "--rm", tag, "pip", "list", "--no-cache-dir", "--format=json").stdout)
            installed = {re.sub(r"[-_.]+", "-", p["name"]).lower(): p["version"] for p in listed}
            # uvloop/httptools matter: with plain asyncio and WORKERS>1, uvicorn's shared socket leaves TCP_NODELAY off.
            image["packages"] = {
                name: installed.get(name)
                for name in ("onnxruntime", "tokenizers", "fastapi", "uvicorn", "uvloop", "httptools", "awslambdaric", "numpy")
            }
            image["packages_total"] = len(installed)
            print(f"image {image['size_mb']} MB, built in {image['build_s']} s", flush=True)
            starts = start_to_first_predict(tag, args.starts)
            print(f"start to first /predict: {starts}", flush=True)
            cold = lambda_cold_start_in_image(tag, args.starts)
            print(f"lambda cold start in the image: {cold}", flush=True)
            runtime = lambda_runtime(tag, args.warm_events)
            print(f"lambda runtime: {runtime}", flush=True)
            loads = []
            for workers, threads in ((1, 0), (2, 1)):
                loads.append(http_load(tag, workers, threads, args.duration, args.connections, lua))
                print(f"http load: {loads[-1]}", flush=True)
        finally:
            remove_image(tag)
    from mlops_basics.core.artifacts import package_versions

    median = lambda runs, key: round(statistics.median(r[key] for r in runs), 3)
    result = {
        "what": f"the serving image (HTTP and Lambda) with the trained {(metadata.get('source') or {}).get('backbone')}, ONNX "
        + metadata["default_variant"],
        "date": dt.date.today().isoformat(),
        "machine": info,
        "model": {
            "source": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
            "version": model_version(metadata),
            "backbone": (metadata.get("source") or {}).get("backbone"),
            "variant": metadata["default_variant"],
            "max_length": metadata.get("max_length"),
            "validation_mcc": metadata["variants"][metadata["default_variant"]]["metrics"].get("mcc"),
            "variants": {v: {"bytes": spec["bytes"], "validation_mcc": spec["metrics"].get("mcc")} for v, spec in metadata["variants"].items()},
        },
        "image": image,
        "container_start_to_first_predict_s": {"runs": starts, "median": round(statistics.median(starts), 3)},
        "lambda": {
            "cold_start_in_image": {
                "runs": cold,
                "import_s": median(cold, "import_s"),
                "model_load_s": median(cold, "model_load_s"),
                "first_event_s": median(cold, "first_event_s"),
                "warm_handler_ms_p50": median(cold, "warm_handler_ms_p50"),
            },
            "runtime_client": runtime,
        },
        "http_load": loads,
        "notes": {
            "peak_memory_mb": "the container's cgroup peak (memory.peak, or max_usage_in_bytes on cgroup v1): includes the page cache of the model files",
            "peak_rss_mb": "sum of the peak resident memory (VmHWM) of the container's processes, read at the end",
            "latency": "wrk's latency (client side, over the loopback and podman's port forwarding); warm Lambda latency is from "
            "handing an event to the runtime client to receiving its response",
            "cold_start_in_image": "a fresh python3 in the image: import mlops_basics.serving.lambda_handler, then runtime() (load the model, "
            "warm-up predict), then the first and 50 more direct events straight to the handler",
        },
        "versions": package_versions(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    staging = args.output.with_name(f".{args.output.name}.tmp")
    staging.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(staging, args.output)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
