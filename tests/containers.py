"""Podman helpers for the serving image, shared by the container tests, the serving benchmark and anyone who pushes the image.

- `podman(...)` runs podman with this project's containers.conf (runc, cgroupfs, low default ulimits).
- `ensure_base_image()` makes (once, then cached) a local Debian bookworm + python3 base image, because base images cannot be
  pulled from a registry here: debootstrap -> rootfs tarball under ~/.cache/mlops-basics -> `podman import`.
- `make_build_context(serving_dir)` copies what the Dockerfile needs, plus a serving directory, into a temporary directory,
  so a user's own artifacts/ is never read or touched. `build_image(context, tag)` builds it with the CA bundle as a build secret.
- `run_http_container(...)` / `LambdaRuntimeAPI` run the image as an HTTP server or as a Lambda function.

    from containers import ensure_base_image, make_build_context, build_image, podman
    tag = build_image(make_build_context("artifacts/serving"), "localhost/mlops-basics:dev", base=ensure_base_image())
    podman("push", tag, "docker://registry.example.com/mlops-basics:dev")
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = Path(__file__).resolve().with_name("containers.conf")  # absolute: podman build subprocesses change directory
CACHE_DIR = Path(os.environ.get("MLOPS_CACHE_DIR") or Path.home()/".cache"/"mlops-basics")
BASE_IMAGE = "localhost/mlops-basics-base:bookworm"
BASE_ROOTFS = CACHE_DIR/"bookworm-python3-rootfs.tar"
BASE_PACKAGES = ("python3", "python3-venv", "passwd")  # passwd: useradd, for the image's non-root user
DEBIAN_MIRROR = os.environ.get("MLOPS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path(os.environ.get("MLOPS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
# What the Dockerfile reads from its context (see .dockerignore); the serving directory goes to artifacts/serving.
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "setup.py", "settings.ini", "README.md", "LICENSE", "constraints.txt", "mlops_basics",
                 "docker/entrypoint.sh")
IMAGE_USER = "mlops"


class PodmanError(RuntimeError):
    "A podman command failed; the message has its command line and the end of its output."


def podman_env() -> dict[str, str]:
    "The environment podman runs in: this project's containers.conf (and nothing else) configures it."
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: Any, # podman's arguments
           check: bool = True, # raise `PodmanError` on a non-zero exit
           timeout: float = 600, # seconds
           input: bytes | None = None, # standard input
          ) -> subprocess.CompletedProcess:
    "Run podman with the project's configuration; text output captured."
    if not shutil.which("podman"): raise PodmanError("podman is not installed: run .ci/system-packages (as root or with sudo)")
    command = ["podman", *map(str, args)]
    proc = subprocess.run(command, env=podman_env(), capture_output=True, timeout=timeout, input=input)
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        raise PodmanError(f"`{' '.join(command)}` failed with exit code {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def image_exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def build_base_rootfs(rootfs: Path = BASE_ROOTFS, # the tarball to write
                      mirror: str = DEBIAN_MIRROR, # a Debian mirror
                      suite: str = "bookworm", # Debian release (its python3 is 3.11)
                     ) -> Path:
    "A minimal Debian root file system with python3 and venv, as a tarball (debootstrap; needs root)."
    if not shutil.which("debootstrap"): raise PodmanError("debootstrap is not installed: run .ci/system-packages")
    if os.geteuid() != 0: raise PodmanError("debootstrap needs root to build the base image's root file system")
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=rootfs.parent))  # same file system: the final rename is atomic
    try:
        target = work/"root"
        proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(target), mirror],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0: raise PodmanError(f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        # No package caches or lists, and none of the build machine's identity (podman provides these files at run time).
        for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "var/log/*.log", "var/log/apt/*", "tmp/*"):
            for path in target.glob(pattern):
                if path.is_file() or path.is_symlink(): path.unlink()
                elif path.is_dir(): shutil.rmtree(path)
        for name in ("etc/hostname", "etc/resolv.conf", "etc/hosts"): (target/name).write_text("")
        if not (target/"etc"/"mtab").is_symlink(): (target/"etc"/"mtab").symlink_to("/proc/mounts")  # else the runtime adds it
        staging = work/"rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-C", str(target), "-cf", str(staging), "."], check=True, timeout=600)
        os.replace(staging, rootfs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rootfs


def ensure_base_image(image: str = BASE_IMAGE, # the local image to make
                      rootfs: Path = BASE_ROOTFS, # its cached root file system tarball
                     ) -> str:
    "The local base image (Debian bookworm minbase + python3 + venv), imported from the cached tarball, built first if needed."
    if image_exists(image): return image
    if not rootfs.exists(): build_base_rootfs(rootfs)
    podman("import", "--change", "ENV LANG=C.UTF-8", "--change", "CMD [\"python3\"]",
           "--message", "debootstrap --variant=minbase bookworm + python3, python3-venv", str(rootfs), image)
    return image


def make_build_context(serving_dir: str | Path, # a serving directory written by `mlops-export` (or `dvc pull`)
                       dest: str | Path | None = None, # an empty or missing directory; None: a new temporary one
                      ) -> Path:
    "A build context with the Dockerfile's inputs from this repository and `serving_dir` as artifacts/serving."
    serving_dir = Path(serving_dir)
    if not (serving_dir/"metadata.json").is_file():
        raise FileNotFoundError(f"{serving_dir} is not a serving directory (no metadata.json): run mlops-export or dvc pull first")
    dest = Path(dest) if dest else Path(tempfile.mkdtemp(prefix="mlops-image-context-"))
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()): raise FileExistsError(f"{dest} is not empty: a build context must hold only what the image needs")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in CONTEXT_FILES:
        src, out = ROOT/name, dest/name
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir(): shutil.copytree(src, out, ignore=ignore)
        else: shutil.copy2(src, out)  # copy2 keeps the mode: entrypoint.sh stays executable
    shutil.copytree(serving_dir, dest/"artifacts"/"serving")  # keeps the export's 0644 modes
    return dest


def build_image(context: str | Path, # from `make_build_context`
                tag: str, # e.g. localhost/mlops-basics:dev
                base: str | None = None, # the BASE build argument; None: the Dockerfile's default (python:3.11-slim)
                ca_bundle: str | Path | None = CA_BUNDLE, # CA bundle for pip, passed as a build secret (never a layer); None: none
                build_args: dict[str, str] | None = None, # more build arguments
                network: str = "host", # the network RUN steps use (host: no bridge needed while building)
                layers: bool = False, # keep intermediate images as a build cache (False: only the tagged image remains)
                timeout: float = 1800, # seconds
               ) -> tuple[str, str]:
    "Build the serving image from `context` (docker format, so HEALTHCHECK is kept); returns (tag, build log)."
    args = ["build", "--format", "docker", "--pull=never" if base and base.startswith("localhost/") else "--pull=missing",
            f"--layers={str(layers).lower()}", "--force-rm", "--network", network, "--tag", tag, "--file", Path(context)/"Dockerfile"]
    for key, value in {**({"BASE": base} if base else {}), **(build_args or {})}.items(): args += ["--build-arg", f"{key}={value}"]
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file(): raise FileNotFoundError(f"CA bundle {ca_bundle} not found")
        args += ["--secret", f"id=ca_bundle,src={ca_bundle}"]
    proc = podman(*args, context, timeout=timeout)
    return tag, proc.stdout + proc.stderr


def remove_image(tag: str) -> None:
    "Remove an image (and its now unused layers); no error if it is gone."
    podman("rmi", "--force", tag, check=False, timeout=300)


def remove_container(name: str) -> None:
    podman("rm", "--force", "--time", "5", name, check=False, timeout=120)


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server to bind later, never the same one twice in this process.
    Chosen below the kernel's ephemeral range: a port from that range (what binding port 0 returns) can be taken by any
    outgoing connection between the choice and the server's bind, so a server would fail to start now and then."""
    try: ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError): ephemeral_low = 32768  # Linux's default
    ports = list(range(10_000, max(ephemeral_low, 10_001)))
    random.SystemRandom().shuffle(ports)
    for port in ports:
        if port in _PORTS_GIVEN: continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try: s.bind(("127.0.0.1", port))
            except OSError: continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port on 127.0.0.1 between 10000 and {ephemeral_low}")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    "(status, headers, body) of one HTTP request, HTTP errors included."
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r: return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e: return e.code, dict(e.headers), e.read()


def container_state(name: str) -> dict[str, Any]:
    return json.loads(podman("inspect", "--type", "container", "--format", "{{json .State}}", name).stdout)


def wait_for_http(url: str, container: str | None = None, timeout: float = 180) -> float:
    "Seconds until `url` answers 200; fails early with the container's logs if it exits."
    started, deadline = time.perf_counter(), time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if http("GET", url, timeout=2)[0] == 200: return time.perf_counter() - started
        except OSError: pass
        if container and not container_state(container).get("Running"):
            raise PodmanError(f"container {container} exited: {podman('logs', container, check=False).stderr[-3000:]}")
        time.sleep(0.1)
    logs = podman("logs", container, check=False) if container else None
    raise TimeoutError(f"{url} did not answer 200 in {timeout} s" + (f"; logs:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}" if logs else ""))


def publish_args(port: int, # the host port (127.0.0.1 only)
                 container_port: int = 8080, # the port the server listens on in the container
                ) -> list[str]:
    """`podman run` arguments that make the container's HTTP server reachable on 127.0.0.1:`port`.
    MLOPS_PODMAN_NETWORK=host uses the host's network instead, the server listening on 127.0.0.1:`port` (for machines where
    podman's bridge network or port publishing does not work)."""
    if os.environ.get("MLOPS_PODMAN_NETWORK") == "host": return ["--network", "host", "--env", "HOST=127.0.0.1", "--env", f"PORT={port}"]
    return ["--publish", f"127.0.0.1:{port}:{container_port}"]


@contextlib.contextmanager
def run_http_container(image: str, # the serving image
                       *extra: str, # more `podman run` arguments (before the image), e.g. --env WORKERS=2
                       command: tuple[str, ...] = (), # the container command; () runs the image's default (serve)
                       timeout: float = 180, # seconds to wait for /health
                      ) -> Iterator[tuple[str, str, float]]:
    "Run the HTTP server container on a free 127.0.0.1 port: yields (base URL, container name, seconds to healthy); removed after."
    name, port = f"mlops-test-{uuid.uuid4().hex[:10]}", free_port()
    started = time.perf_counter()
    podman("run", "--detach", "--name", name, *publish_args(port), *extra, image, *command)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", name, timeout)
        yield url, name, time.perf_counter() - started
    finally:
        remove_container(name)


def container_memory_peak_bytes(name: str) -> int | None:
    "The container's peak memory use so far from its cgroup (v2 memory.peak or v1 max_usage_in_bytes); None if unavailable."
    state = container_state(name)
    path = state.get("CgroupPath") or ""
    pid = state.get("Pid")
    candidates = []
    if pid:  # the cgroup of the container's init process, as the kernel reports it
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, cgroup = line.split(":", 2)
            if controllers == "": candidates.append(Path("/sys/fs/cgroup")/cgroup.lstrip("/")/"memory.peak")
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory")/cgroup.lstrip("/")/"memory.max_usage_in_bytes")
    if path: candidates += [Path("/sys/fs/cgroup")/path.lstrip("/")/"memory.peak", Path("/sys/fs/cgroup/memory")/path.lstrip("/")/"memory.max_usage_in_bytes"]
    for candidate in candidates:
        if candidate.is_file():
            try: return int(candidate.read_text().strip())
            except (OSError, ValueError): continue
    return None


def container_peak_rss_bytes(name: str) -> int | None:
    "The sum over the container's processes of their peak resident memory (VmHWM), read inside the container."
    probe = ("import pathlib; print(sum(int(l.split()[1]) * 1024 for p in pathlib.Path('/proc').iterdir() if p.name.isdigit() "
             "for l in (p/'status').read_text().splitlines() if l.startswith('VmHWM:')))")
    proc = podman("exec", name, "python3", "-c", probe, check=False)
    return int(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip().isdigit() else None


# --- A Lambda Runtime API for the runtime client (awslambdaric) in the image -------------------------------------------------

RUNTIME_PREFIX = "/2018-06-01/runtime"


@dataclass
class Invocation:
    "One event handed to the runtime client, and what it posted back."
    request_id: str
    event: Any
    kind: str | None = None  # "response" or "error"
    payload: Any = None  # the response or error JSON
    error_type: str | None = None  # the Lambda-Runtime-Function-Error-Type header of an error
    delivered: float | None = None  # time.perf_counter() when the runtime client received the event
    answered: float | None = None  # ... and when its answer arrived
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def seconds(self) -> float: return self.answered - self.delivered


class LambdaRuntimeAPI:
    """A minimal Lambda Runtime API on 127.0.0.1 (a free port): the runtime client in the container polls it for events.
    GET /2018-06-01/runtime/invocation/next, POST .../invocation/{id}/response and .../invocation/{id}/error, POST .../init/error.
    Use as a context manager; `invoke(event)` queues an event and waits for its answer."""
    function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:mlops-basics"

    def __init__(self, deadline_s: float = 120):
        self.deadline_s = deadline_s
        self.pending: queue.Queue[Invocation] = queue.Queue()
        self.invocations: dict[str, Invocation] = {}
        self.init_errors: list[tuple[str | None, Any]] = []
        self.first_poll: float | None = None  # when the runtime client first asked for an event (its init is done)
        self.closed = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        "host:port, the value of AWS_LAMBDA_RUNTIME_API."
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> "LambdaRuntimeAPI":
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` is answered at once

            def log_message(self, *args): pass

            def setup(self):
                super().setup()
                # Headers and body go out in separate writes: without this, Nagle's algorithm and the client's delayed
                # ACK would add ~40 ms to every answer.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)):
                        data += self.rfile.read(size); self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes = b"", headers: dict | None = None):
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **(headers or {})}.items(): self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body))); self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError): self.close_connection = True  # the client has gone (container stopped)

            def do_GET(self):
                if self.path != f"{RUNTIME_PREFIX}/invocation/next": return self._reply(404, b'{"errorType":"NotFound"}')
                if api.first_poll is None: api.first_poll = time.perf_counter()
                while not api.closed.is_set():
                    try: invocation = api.pending.get(timeout=0.2)
                    except queue.Empty: continue
                    invocation.delivered = time.perf_counter()
                    return self._reply(200, json.dumps(invocation.event).encode(), {
                        "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                        "Lambda-Runtime-Deadline-Ms": str(int((time.time() + api.deadline_s) * 1000)),
                        "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
                        "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{invocation.request_id[:24]};Sampled=0"})
                self._reply(500, b'{"errorType":"ShuttingDown"}')

            def do_POST(self):
                body = self._body()
                try: payload = json.loads(body) if body else None
                except ValueError: payload = body.decode(errors="replace")
                error_type = self.headers.get("Lambda-Runtime-Function-Error-Type")
                if self.path == f"{RUNTIME_PREFIX}/init/error":
                    api.init_errors.append((error_type, payload))
                    return self._reply(202, b'{"status":"OK"}')
                match = re.fullmatch(rf"{RUNTIME_PREFIX}/invocation/([^/]+)/(response|error)", self.path)
                invocation = api.invocations.get(match[1]) if match else None
                if invocation is None: return self._reply(404, b'{"errorType":"InvalidRequestID"}')
                invocation.kind, invocation.payload, invocation.error_type = match[2], payload, error_type
                invocation.answered = time.perf_counter()
                invocation.done.set()
                self._reply(202, b'{"status":"OK"}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.closed.set()
        self.server.shutdown(); self.server.server_close()

    def submit(self, event: Any) -> Invocation:
        "Queue `event` for the runtime client."
        invocation = Invocation(uuid.uuid4().hex, event)
        self.invocations[invocation.request_id] = invocation
        self.pending.put(invocation)
        return invocation

    def invoke(self, event: Any, # the event JSON
               timeout: float = 180, # seconds to wait for the answer
               container: str | None = None, # the function's container: fail early, with its logs, if it exits
              ) -> Invocation:
        "Queue `event` and wait until the runtime client posts its response or error."
        invocation, deadline = self.submit(event), time.perf_counter() + timeout
        while not invocation.done.wait(0.2):
            if container and not container_state(container).get("Running"):
                logs = podman("logs", container, check=False)
                raise PodmanError(f"the function's container exited; init errors {self.init_errors}; logs:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
            if time.perf_counter() > deadline: raise TimeoutError(f"no answer to event {invocation.request_id} in {timeout} s")
        return invocation


def lambda_run_args(api: LambdaRuntimeAPI, # the Runtime API the container polls
                    name: str, # the container's name
                    read_only: bool = True, # read-only root file system with only /tmp writable, as on AWS Lambda
                   ) -> list[str]:
    "`podman run` arguments for the image as a Lambda function (the host network: the Runtime API listens on 127.0.0.1)."
    args = ["--detach", "--name", name, "--network", "host", "--env", f"AWS_LAMBDA_RUNTIME_API={api.address}",
            "--env", "AWS_LAMBDA_FUNCTION_NAME=mlops-basics", "--env", "AWS_LAMBDA_FUNCTION_VERSION=$LATEST",
            "--env", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE=2048", "--env", "AWS_REGION=eu-west-1"]
    if read_only: args += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m,mode=1777"]
    return args


@contextlib.contextmanager
def run_lambda_container(image: str, # the serving image
                         *extra: str, # more `podman run` arguments (before the image), e.g. --user 993:990
                         command: tuple[str, ...] = ("lambda",), # the container command; () runs the image's default
                        ) -> Iterator[tuple[LambdaRuntimeAPI, str, float]]:
    "Run the image as a Lambda function against a fresh Runtime API: yields (the API, container name, perf_counter at `podman run`); removed after."
    name = f"mlops-test-{uuid.uuid4().hex[:10]}"
    with LambdaRuntimeAPI() as api:
        started = time.perf_counter()
        try:
            podman("run", *lambda_run_args(api, name), *extra, image, *command)
            yield api, name, started
        finally:
            remove_container(name)
