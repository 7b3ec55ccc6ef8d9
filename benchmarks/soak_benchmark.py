"""Soak: one `mlops-serve` worker under a long stream of mixed valid and invalid requests at a fixed concurrency.

Sends --requests requests (100,000 by default) over --concurrency keep-alive connections: four valid bodies in five
(1 to 4 sentences), the rest invalid (an empty batch, malformed JSON, a sentence over the limit, a wrong type, a wrong
content type). Every --slice requests it records the server's resident memory (RSS) and open file descriptors (from
/proc) and the slice's throughput and p50/p99 latency as the client saw it. Targets: RSS after the last slice within 10%
of after the first, no valid request answered with anything but 200, every invalid one with its 4xx, and one log line per
request. Writes benchmarks/results/soak.json (rendered on nbs/benchmarks.ipynb). Run with nothing else busy:

    python benchmarks/soak_benchmark.py [--serving-dir artifacts/serving] [--requests 100000] [--concurrency 8]
"""

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving_benchmark import SENTENCES  # the same eight sentences in every serving benchmark

from mlops_basics.devtools.test_utils import free_port, http

ROOT = Path(__file__).resolve().parents[1]
from serving_benchmark import cpu_model  # noqa: E402  (run as a script: benchmarks/ is on the path)

RESULT = ROOT / "benchmarks" / "results" / "soak.json"
JSON = "application/json"
INVALID = [  # (body, content type, the status it must get)
    (b'{"sentences": []}', JSON, 422),
    (b'{"sentences": ["unclosed', JSON, 400),
    (json.dumps({"sentences": ["x" * 5000]}).encode(), JSON, 422),
    (b'{"sentences": "not a list"}', JSON, 422),
    (b"sentences=hello", "application/x-www-form-urlencoded", 415),
]


def request_body(i: int) -> tuple[bytes, str, int]:
    "Request number i: (body, content type, expected status); four in five are valid."
    if i % 5 == 4:
        return INVALID[(i // 5) % len(INVALID)]
    batch = [SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4)]
    return json.dumps({"sentences": batch}).encode(), JSON, 200


async def post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, body: bytes, content_type: str) -> int:
    "One keep-alive POST /predict; its status (the body is read and dropped)."
    writer.write(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


def proc_stats(pid: int) -> dict:
    "RSS (MB) and open file descriptors of a process, from /proc."
    rss_kb = next(int(l.split()[1]) for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kb / 1024, 1), "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def soak(port: int, pid: int, requests: int, concurrency: int, slice_size: int) -> tuple[list[dict], dict]:
    "Send the requests; per-slice figures and the counts of wrong answers."
    host, counter, wrong = f"127.0.0.1:{port}", iter(range(requests)), {"valid_not_200": 0, "invalid_wrong_status": 0, "errors": []}
    latencies: list[float] = []
    slices, started = [], time.perf_counter()
    lock = asyncio.Lock()

    async def close_slice():
        nonlocal started, latencies
        now, ordered = time.perf_counter(), sorted(latencies)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000
        slices.append(
            {
                "requests_done": len(slices) * slice_size + len(ordered),
                "requests_per_s": round(len(ordered) / (now - started), 1),
                "p50_ms": round(pick(0.50), 2),
                "p99_ms": round(pick(0.99), 2),
                **proc_stats(pid),
            }
        )
        print(json.dumps(slices[-1]), flush=True)
        latencies, started = [], now

    async def client():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                body, content_type, expected = request_body(i)
                t0 = time.perf_counter()
                status = await post(reader, writer, host, body, content_type)
                elapsed = time.perf_counter() - t0
                if status != expected:
                    wrong["valid_not_200" if expected == 200 else "invalid_wrong_status"] += 1
                    if len(wrong["errors"]) < 20:
                        wrong["errors"].append({"request": i, "expected": expected, "got": status})
                async with lock:
                    latencies.append(elapsed)
                    if len(latencies) == slice_size:
                        await close_slice()
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    if latencies:
        await close_slice()
    return slices, wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving-dir", default=str(ROOT / "artifacts" / "serving"))
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--slice", type=int, default=10_000)
    parser.add_argument("--out", default=str(RESULT))
    args = parser.parse_args()
    port, bin_dir = free_port(), Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "requests.log"
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [str(bin_dir / "mlops-serve"), "--serving-dir", args.serving_dir, "--port", str(port), "--workers", "1"],
                stdout=out,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.time() + 120
                while True:
                    try:
                        if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                            break
                    except OSError:
                        pass
                    if server.poll() is not None or time.time() > deadline:
                        raise SystemExit("the server did not start")
                    time.sleep(0.3)
                health = json.loads(http("GET", f"http://127.0.0.1:{port}/health")[2])
                at_start = proc_stats(server.pid)
                t0 = time.perf_counter()
                slices, wrong = asyncio.run(soak(port, server.pid, args.requests, args.concurrency, args.slice))
                wall = time.perf_counter() - t0
            finally:
                server.terminate()
                server.wait(timeout=30)
        logged = sum(1 for line in log.read_text().splitlines() if '"request_id"' in line and '"/predict"' in line)
    growth = slices[-1]["rss_mb"] / slices[0]["rss_mb"] - 1
    result = {
        "what": "soak: one mlops-serve worker, mixed valid (4/5) and invalid (1/5) POST /predict bodies, fixed concurrency, keep-alive",
        "date": dt.date.today().isoformat(),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "note": "the client (one asyncio process) and the server share the cores",
        },
        "model": {"version": health["model"]["version"], "variant": health["model"]["variant"], "backbone": health["model"]["backbone"]},
        "requests": args.requests,
        "concurrency": args.concurrency,
        "slice": args.slice,
        "wall_s": round(wall, 1),
        "at_start": at_start,
        "slices": slices,
        "wrong_answers": wrong,
        "log_lines": logged,
        "rss_growth_first_to_last_slice": round(growth, 4),
        "targets": {
            "rss_within_10_percent": abs(growth) <= 0.10,
            "no_error_to_valid_requests": wrong["valid_not_200"] == 0,
            "every_invalid_request_got_its_4xx": wrong["invalid_wrong_status"] == 0,
            "one_log_line_per_request": logged == args.requests,
        },
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "rss_growth_first_to_last_slice", "targets")}, indent=1))


if __name__ == "__main__":
    main()
