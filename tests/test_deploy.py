"""A full rehearsal of push + release: moto answers ECR, Lambda, IAM and CloudWatch Logs; Debian's docker-registry
receives the real image layers (moto has no registry endpoint); the pushed image is pulled back, its digest checked,
and run as the smoke-test target of the release. Failures must leave the alias where it was (or, on a first release,
leave none). moto's ECR does not see the local registry, so where a test needs ECR to know a pushed image it registers
the pushed manifest with moto (`ecr.put_image`), as ECR holds it after a real push."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from conftest import run_workflow_step, workflow_job, workflow_step
from mlops_basics.devtools.containers import (
    BASE_IMAGE,
    CA_BUNDLE,
    ensure_base_image,
    make_build_context,
    podman,
    podman_env,
    remove_image,
    run_http_container,
)
from mlops_basics.devtools.rehearsal import registry_server
from mlops_basics.devtools.test_utils import BIN, free_port

pytestmark = pytest.mark.slow
REGION = "eu-west-1"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    "Debian's docker-registry on 127.0.0.1 with storage in a temporary directory; yields host:port."
    with registry_server(tmp_path_factory.mktemp("registry")) as host:
        yield host


@pytest.fixture(scope="module")
def aws(moto_server):
    "Deploy settings pointing at moto, with the function's execution role created there."
    role = boto3.client("iam", endpoint_url=moto_server, region_name=REGION).create_role(
        RoleName=f"mlops-basics-{uuid.uuid4().hex[:6]}",
        AssumeRolePolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}],
            }
        ),
    )["Role"]["Arn"]
    env = {
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "MLOPS_LAMBDA_ROLE_ARN": role,
        "MLOPS_LAMBDA_FUNCTION": f"mlops-basics-{uuid.uuid4().hex[:6]}",
    }
    return env


def deploy(*args, env) -> subprocess.CompletedProcess:
    "Run `mlops-deploy` with the moto settings (and the project's podman configuration)."
    return subprocess.run([str(BIN / "mlops-deploy"), *map(str, args)], capture_output=True, text=True, timeout=900, env={**podman_env(), **env})


def alias_version(env) -> str:
    lam = boto3.client("lambda", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION)
    return lam.get_alias(FunctionName=env["MLOPS_LAMBDA_FUNCTION"], Name="live")["FunctionVersion"]


def alias_routing(env) -> tuple[str, dict] | None:
    "The alias's version and extra weights; None when there is no alias."
    lam = boto3.client("lambda", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION)
    try:
        alias = lam.get_alias(FunctionName=env["MLOPS_LAMBDA_FUNCTION"], Name="live")
    except lam.exceptions.ResourceNotFoundException:
        return None
    return alias["FunctionVersion"], (alias.get("RoutingConfig") or {}).get("AdditionalVersionWeights") or {}


def new_function(env) -> dict:
    "The same settings with a function of its own, so that a test does not depend on what another did."
    return {**env, "MLOPS_LAMBDA_FUNCTION": f"mlops-basics-{uuid.uuid4().hex[:6]}"}


def stand_in_image(tag: str) -> str:
    "An image URI by digest; moto does not check that it exists, which suits tests of the alias logic."
    return f"123456789012.dkr.ecr.{REGION}.amazonaws.com/mlops-basics@sha256:{tag * 64}"


def register_in_ecr(env, registry, tag, digest, tags):
    "Tell moto's ECR about an image pushed to the local registry (its manifest, under `tags`), as ECR would hold it."
    manifest = subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry}/mlops-basics:{tag}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    ecr = boto3.client("ecr", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION)
    for t in tags:
        ecr.put_image(repositoryName="mlops-basics", imageManifest=manifest, imageTag=t, imageDigest=digest)


def test_push_pull_release_and_rollback(image, registry, aws, tmp_path):
    sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    pushed = deploy("push", "--image", image.tag, "--tag", sha, "--tag", "v0.1.0", "--registry", registry, "--insecure-registry", env=aws)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    result = json.loads(pushed.stdout.strip().splitlines()[-1])
    digest = result["image_uri"].split("@", 1)[1]
    assert result["image_uri"].startswith(f"123456789012.dkr.ecr.{REGION}.amazonaws.com/mlops-basics@sha256:")

    # The registry holds both tags, and the image pulled back has the digest the push reported.
    with urllib.request.urlopen(f"http://{registry}/v2/mlops-basics/tags/list", timeout=10) as r:
        assert sorted(json.load(r)["tags"]) == sorted([sha, "v0.1.0"])
    inspected = json.loads(
        subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry}/mlops-basics:{sha}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert inspected["Digest"] == digest
    pulled = f"{registry}/mlops-basics:{sha}"
    podman("rmi", "--force", pulled, check=False)
    podman("pull", "--tls-verify=false", pulled, timeout=600)
    try:
        assert f"{registry}/mlops-basics@{digest}" in json.loads(podman("image", "inspect", "--format", "{{json .RepoDigests}}", pulled).stdout)

        # The deploy of the same commit again: ECR holds both (immutable) tags, so nothing is pushed, and the image is the
        # same. The registry given is dead: any attempt to log in or push there would fail.
        register_in_ecr(aws, registry, sha, digest, [sha, "v0.1.0"])
        dead_registry = f"127.0.0.1:{free_port()}"
        again = deploy("push", "--image", image.tag, "--tag", sha, "--tag", "v0.1.0", "--registry", dead_registry, "--insecure-registry", env=aws)
        assert again.returncode == 0, again.stderr[-2000:]
        again = json.loads(again.stdout.strip().splitlines()[-1])
        assert (again["repository_changes"], again["image_uri"], again["already_in_ecr"]) == ([], result["image_uri"], sorted([sha, "v0.1.0"]))

        # A tag that ECR holds for another image cannot move to this one: the push says so and fails.
        fresh, clash = f"fresh-{uuid.uuid4().hex[:8]}", f"clash-{uuid.uuid4().hex[:8]}"
        other_digest = "sha256:" + "c" * 64
        boto3.client("ecr", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=REGION).put_image(
            repositoryName="mlops-basics",
            imageTag=clash,
            imageDigest=other_digest,
            imageManifest=json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "layers": [],
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": other_digest, "size": 2},
                }
            ),
        )
        try:
            clashed = deploy("push", "--image", image.tag, "--tag", fresh, "--tag", clash, "--registry", registry, "--insecure-registry", env=aws)
        finally:
            remove_image(f"{registry}/mlops-basics:{fresh}")
        assert clashed.returncode == 2, clashed.stdout + clashed.stderr[-2000:]
        assert f"tag '{clash}' already names {other_digest}" in clashed.stderr and f"not the image just pushed ({digest}" in clashed.stderr

        # Release, smoke-testing the pulled-back image running as an HTTP server.
        with run_http_container(pulled) as (url, _, _):
            released = deploy("release", "--image-uri", result["image_uri"], "--smoke-url", url, "--description", sha, env=aws)
            assert released.returncode == 0, released.stderr[-3000:]
            first = json.loads(released.stdout)
            assert first["previous_version"] is None and first["smoke_test"]["predictions"]
            assert alias_version(aws) == first["version"]
            # Idempotent: the same release again publishes nothing and changes nothing.
            same = json.loads(deploy("release", "--image-uri", result["image_uri"], "--smoke-url", url, env=aws).stdout)
            assert (same["version"], same["changes"]) == (first["version"], [])
    finally:
        for tag in (sha, "v0.1.0"):
            remove_image(f"{registry}/mlops-basics:{tag}")  # push_image tagged both locally

    # A new image whose smoke test fails: the alias goes back to the released version.
    other = result["image_uri"].split("@")[0] + "@sha256:" + "f" * 64
    dead = f"http://127.0.0.1:{free_port()}"
    failed = deploy("release", "--image-uri", other, "--smoke-url", dead, env=aws)
    assert failed.returncode == 2 and f"rolled back to version {first['version']}" in failed.stderr
    assert alias_version(aws) == first["version"]
    status = json.loads(deploy("status", env=aws).stdout)
    assert status["version"] == first["version"] and len(status["versions"]) == 3  # $LATEST, the release, the rolled-back one


def test_a_failed_release_puts_the_alias_back_exactly(aws):
    "A canary is running (20% on version 2) when a release fails its smoke test: the alias goes back to that, weights included."
    env = new_function(aws)
    for tag in "12":
        assert deploy("release", "--image-uri", stand_in_image(tag), env=env).returncode == 0
    boto3.client("lambda", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION).update_alias(
        FunctionName=env["MLOPS_LAMBDA_FUNCTION"], Name="live", FunctionVersion="1", RoutingConfig={"AdditionalVersionWeights": {"2": 0.2}}
    )
    failed = deploy("release", "--image-uri", stand_in_image("3"), "--smoke-url", f"http://127.0.0.1:{free_port()}", env=env)
    assert failed.returncode == 2 and "alias 'live' rolled back to version 1, 20% of traffic to version 2" in failed.stderr, failed.stderr
    assert alias_routing(env) == ("1", {"2": 0.2})


def test_a_failed_first_release_leaves_no_alias(aws):
    "With no alias before, a failed release deletes the one it created: nothing unchecked is live."
    env = new_function(aws)
    failed = deploy("release", "--image-uri", stand_in_image("1"), "--smoke-url", f"http://127.0.0.1:{free_port()}", env=env)
    assert failed.returncode == 2 and "alias 'live' deleted, as it did not exist before: no version is live" in failed.stderr, failed.stderr
    assert alias_routing(env) is None


def test_a_failed_push_leaves_the_alias_alone(image, aws):
    env = new_function(aws)
    released = deploy("release", "--image-uri", stand_in_image("a"), env=env)
    assert released.returncode == 0, released.stderr
    before, versions = alias_routing(env), json.loads(deploy("status", env=env).stdout)["versions"]
    assert before == (json.loads(released.stdout)["version"], {})
    dead_registry = f"127.0.0.1:{free_port()}"
    failed = deploy(
        "push", "--image", image.tag, "--tag", f"broken-{uuid.uuid4().hex[:8]}", "--registry", dead_registry, "--insecure-registry", env=env
    )
    assert failed.returncode == 2 and "mlops-deploy:" in failed.stderr and dead_registry in failed.stderr
    assert alias_routing(env) == before and json.loads(deploy("status", env=env).stdout)["versions"] == versions


def test_missing_settings_are_named(aws):
    no_region = {k: v for k, v in aws.items() if k != "AWS_REGION"}
    proc = deploy("status", env={**no_region, "AWS_DEFAULT_REGION": ""})
    assert proc.returncode == 2 and "no AWS region: set AWS_REGION" in proc.stderr
    proc = deploy(
        "status",
        env={
            **aws,
            "AWS_ACCESS_KEY_ID": "",
            "AWS_SECRET_ACCESS_KEY": "",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_ENDPOINT_URL": "",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )
    assert proc.returncode == 2 and "no AWS credentials found" in proc.stderr
    no_role = {**aws, "MLOPS_LAMBDA_ROLE_ARN": "", "MLOPS_LAMBDA_FUNCTION": "never-created"}
    proc = deploy("release", "--image-uri", stand_in_image("0"), env=no_role)
    assert proc.returncode == 2 and "set MLOPS_LAMBDA_ROLE_ARN" in proc.stderr
    # An empty smoke URL is a missing setting, not a request to skip the test; nothing is released.
    env = new_function(aws)
    proc = deploy("release", "--image-uri", stand_in_image("0"), "--smoke-url", "", env=env)
    assert proc.returncode == 2 and "the smoke-test URL is empty" in proc.stderr, proc.stderr
    assert "ResourceNotFoundException" in deploy("status", env=env).stderr  # no function was created


# --- The container engine: docker as well as podman, and one engine for build and push ----------------------------------


@pytest.fixture(scope="module")
def dockerd(tmp_path_factory):
    "A Docker daemon of the test's own (Debian's docker.io): its own data, socket and client config; no bridge, no iptables."
    assert shutil.which("dockerd") and shutil.which("docker"), "docker is needed (Debian package docker.io): .ci/system-packages installs it"
    work = tmp_path_factory.mktemp("dockerd")
    run_dir = Path(tempfile.mkdtemp(prefix="mlops-dockerd-", dir="/tmp"))  # short: unix socket paths are limited to ~100 bytes
    env = {"DOCKER_HOST": f"unix://{run_dir}/docker.sock", "DOCKER_CONFIG": str(work / "client")}  # login tokens stay in the test
    log = open(work / "dockerd.log", "wb")
    # Beside a system Docker (GitHub's runners): none of its /etc/docker/daemon.json, and a containerd namespace of our own
    # should this daemon find the system's containerd.
    (work / "daemon.json").write_text("{}")
    proc = subprocess.Popen(
        [
            "dockerd",
            "--config-file",
            work / "daemon.json",
            "--data-root",
            work / "data",
            "--exec-root",
            run_dir / "exec",
            "--pidfile",
            run_dir / "dockerd.pid",
            "-H",
            env["DOCKER_HOST"],
            "--containerd-namespace",
            "mlops-test",
            "--containerd-plugins-namespace",
            "mlops-test-plugins",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--storage-driver=vfs",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while subprocess.run(["docker", "version"], env={**os.environ, **env}, capture_output=True).returncode != 0:
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError((work / "dockerd.log").read_text()[-3000:])
            time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(work / "data", ignore_errors=True)


def registry_manifest(registry: str, tag: str) -> tuple[str, dict]:
    "The digest and the manifest the registry serves for mlops-basics:`tag`."
    request = urllib.request.Request(
        f"http://{registry}/v2/mlops-basics/manifests/{tag}",
        headers={"Accept": ", ".join(("application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"))},
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.headers["Docker-Content-Digest"], json.load(r)


def registry_digest(registry: str, tag: str) -> str:
    "The digest the registry serves for mlops-basics:`tag`."
    return registry_manifest(registry, tag)[0]


def test_the_docker_branch_pushes_for_real(dockerd, registry, aws, tmp_path):
    "The docker branch of `mlops-deploy push`: login, tag, push and the digest read from docker's own output, against the registry."
    docker = lambda *args: subprocess.run(
        ["docker", *map(str, args)], env={**os.environ, **dockerd}, capture_output=True, text=True, timeout=300, check=True
    )
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "release").write_text(f"mlops-basics {uuid.uuid4()}\n")
    subprocess.run(["tar", "-C", rootfs, "-cf", tmp_path / "rootfs.tar", "."], check=True)
    image, sha = f"mlops-basics:docker-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:12]
    docker("import", tmp_path / "rootfs.tar", image)  # docker cannot build the Dockerfile offline (its BuildKit frontend is pulled from Docker Hub)
    # The workflow's way of choosing: MLOPS_CONTAINER_CLI, with podman installed too.
    pushed = deploy(
        "push",
        "--image",
        image,
        "--tag",
        sha,
        "--tag",
        "v0.2.0",
        "--registry",
        registry,
        "--insecure-registry",
        env={**aws, **dockerd, "MLOPS_CONTAINER_CLI": "docker"},
    )
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    result = json.loads(pushed.stdout.strip().splitlines()[-1])
    digest = result["image_uri"].split("@", 1)[1]
    assert digest == registry_digest(registry, sha) == registry_digest(registry, "v0.2.0"), (digest, result)
    # podman's store does not hold the image: had podman been used, the push could not have happened.
    assert podman("image", "exists", image, check=False).returncode == 1
    # Asked for podman instead, the push stops before tagging anything and says which engine holds the image.
    wrong = deploy(
        "push", "--image", image, "--tag", f"{sha}-2", "--registry", registry, "--insecure-registry", "--cli", "podman", env={**aws, **dockerd}
    )
    assert wrong.returncode == 2 and f"the image {image!r} is not in podman's image store; docker holds it" in wrong.stderr, wrong.stderr


def deploy_workflow_steps(registry: str) -> tuple[str, str]:
    "The deploy workflow's build and push scripts, as written but for the push going to the local registry instead of ECR."
    build, push = workflow_step("deploy.yml", "deploy", "Build the image"), workflow_step("deploy.yml", "deploy", "Push to ECR")
    assert build.startswith('"$MLOPS_CONTAINER_CLI" build ') and "mlops-deploy push" in push
    return build, push.replace("mlops-deploy push", f"mlops-deploy push --registry {registry} --insecure-registry", 1)


def github_env(sha: str, output: Path, ref: str | None = "v1.2.3") -> dict[str, str]:
    "What GitHub Actions gives the steps of a run for commit `sha`, on the version tag `ref` (None: a branch), plus the venv's tools."
    return {
        "GITHUB_SHA": sha,
        "GITHUB_REF_TYPE": "tag" if ref else "branch",
        "GITHUB_REF_NAME": ref or "main",
        "GITHUB_OUTPUT": str(output),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }


def pushed_image_uri(output: Path) -> str:
    "The image URI the push step wrote to $GITHUB_OUTPUT."
    return dict(line.split("=", 1) for line in output.read_text().splitlines())["image_uri"]


def test_the_deploy_workflow_builds_and_pushes_with_one_engine(serving_dir, registry, aws, dockerd, tmp_path):
    "The workflow's build and push steps, run in order as written, with podman; and with docker set for the push, the old failure, now clear."
    build, push = deploy_workflow_steps(registry)
    # Rehearsal-only build options: the local base image (no registry to pull python:3.11-slim from), the proxy's CA bundle as
    # the Dockerfile's build secret, the host network for RUN steps, docker's image format (OCI drops the HEALTHCHECK), and no
    # layer cache: podman 4.3 cannot bind-mount a cached stage (`RUN --mount=type=bind,from=wheel` then finds no /dist).
    ensure_base_image()
    build = build.replace(
        '" build ',
        f'" build --format docker --network host --pull=never --layers=false --build-arg BASE={BASE_IMAGE} --secret id=ca_bundle,src={CA_BUNDLE} ',
        1,
    )
    context = make_build_context(serving_dir, tmp_path / "context")
    sha, output = uuid.uuid4().hex + uuid.uuid4().hex[:8], tmp_path / "github_output"
    step = lambda script, engine: run_workflow_step(
        script, context, {**podman_env(), **aws, **dockerd, **github_env(sha, output), "MLOPS_CONTAINER_CLI": engine}
    )
    try:
        built = step(build, "podman")
        assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
        # The original failure: built by one engine, pushed by the other. Now a clear error before anything is tagged.
        output.write_text("")
        mixed = step(push, "docker")
        assert mixed.returncode != 0 and f"the image 'mlops-basics:{sha}' is not in docker's image store; podman holds it" in mixed.stderr, (
            mixed.stderr
        )
        assert output.read_text() == ""
        pushed = step(push, "podman")
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        image_uri = pushed_image_uri(output)
        assert image_uri.startswith(f"123456789012.dkr.ecr.{REGION}.amazonaws.com/mlops-basics@sha256:")
        assert image_uri.split("@", 1)[1] == registry_digest(registry, sha) == registry_digest(registry, "v1.2.3")
    finally:
        for tag in (f"mlops-basics:{sha}", f"{registry}/mlops-basics:{sha}", f"{registry}/mlops-basics:v1.2.3"):
            remove_image(tag)


def test_the_deploy_workflow_as_written_builds_and_pushes_with_docker(registry, aws, dockerd, tmp_path):
    """The workflow's build and push steps with the engine its job sets (docker), on a daemon of the test's own: the image in the
    registry is the one the build step made. Then the push again without the setting: the engine that holds the image is chosen."""
    engine = workflow_job("deploy.yml", "deploy")["env"]["MLOPS_CONTAINER_CLI"]
    assert engine == "docker"  # GitHub's runner builds with docker; podman, installed there too, cannot see docker's images
    build, push = deploy_workflow_steps(registry)
    # A stand-in context: docker cannot build the project's Dockerfile here (its syntax line pulls BuildKit's frontend from
    # Docker Hub); the test above builds that one with podman. Nothing in this one needs a network or a base image.
    context = tmp_path / "context"
    context.mkdir()
    (context / "release").write_text(f"mlops-basics {uuid.uuid4()}\n")  # a new image, with a new digest, on every run
    (context / "Dockerfile").write_text("FROM scratch\nCOPY release /etc/release\n")
    sha, output = uuid.uuid4().hex + uuid.uuid4().hex[:8], tmp_path / "github_output"
    env = {**aws, **dockerd, **github_env(sha, output), "MLOPS_CONTAINER_CLI": engine}
    built = run_workflow_step(build, context, env)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    pushed = run_workflow_step(push, context, env)
    assert pushed.returncode == 0, pushed.stdout[-2000:] + pushed.stderr[-3000:]
    digest = pushed_image_uri(output).split("@", 1)[1]
    served, manifest = registry_manifest(registry, sha)
    assert digest == served == registry_digest(registry, "v1.2.3")
    built_id = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", f"mlops-basics:{sha}"],
        env={**os.environ, **dockerd},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert manifest["config"]["digest"] == built_id  # the image pushed is the image built: same configuration blob
    assert podman("image", "exists", f"mlops-basics:{sha}", check=False).returncode == 1  # podman, first by default, does not hold it

    # No MLOPS_CONTAINER_CLI (a branch run: the SHA tag only): docker is chosen because its store holds the image.
    output.write_text("")
    again = run_workflow_step(push, context, {**env, **github_env(sha, output, ref=None)}, unset=("MLOPS_CONTAINER_CLI",))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert pushed_image_uri(output).split("@", 1)[1] == digest
    # The dockerd fixture deletes its data directory, and with it every image these steps built or tagged.
