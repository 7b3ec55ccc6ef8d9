"""The release workflow from outside: its build and check steps on a clean copy, the tag check, nbdev's version bump, and trusted publishing."""

import configparser
import re
import shutil
import subprocess
import zipfile

from conftest import ROOT, run_workflow_step, workflow_job, workflow_step
from mlops_basics.devtools.test_utils import BIN


def version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "settings.ini")
    return cfg["DEFAULT"]["version"]


def test_build_and_check_steps_make_one_sdist_and_one_wheel(release_build):
    dist = sorted(p.name for p in (release_build / "dist").iterdir())
    assert dist == [f"mlops_basics-{version()}-py3-none-any.whl", f"mlops_basics-{version()}.tar.gz"]
    with zipfile.ZipFile(release_build / "dist" / dist[0]) as z:
        metadata = z.read(f"mlops_basics-{version()}.dist-info/METADATA").decode()
    assert f"Version: {version()}" in metadata and "Description-Content-Type: text/markdown" in metadata
    assert "## Quick start" in metadata  # the README is the project's PyPI page


def test_the_tag_must_be_the_version_in_settings_and_the_changelog(tmp_path):
    script = workflow_step("release.yml", "build", "Check the tag is settings.ini's version")
    ok = run_workflow_step(script, ROOT, {"GITHUB_REF_NAME": f"v{version()}"}, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = run_workflow_step(script, ROOT, {"GITHUB_REF_NAME": "v9.9.9"}, timeout=60)
    assert wrong.returncode == 1 and "nbdev_bump_version" in wrong.stdout
    for name in ("settings.ini", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "CHANGELOG.md").write_text((ROOT / "CHANGELOG.md").read_text().replace(f"## {version()}", "## 0.0.0"))
    missing = run_workflow_step(script, tmp_path, {"GITHUB_REF_NAME": f"v{version()}"}, timeout=60)
    assert missing.returncode == 1 and "CHANGELOG.md has no" in missing.stdout


def test_nbdev_bump_version_bumps_settings_and_the_package(tmp_path):
    shutil.copy(ROOT / "settings.ini", tmp_path / "settings.ini")
    shutil.copytree(ROOT / "mlops_basics", tmp_path / "mlops_basics", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([str(BIN / "nbdev_bump_version")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    major, minor, patch = map(int, version().split("."))
    bumped = f"{major}.{minor}.{patch + 1}"
    assert f"version = {bumped}" in (tmp_path / "settings.ini").read_text()
    assert f'__version__ = "{bumped}"' in (tmp_path / "mlops_basics" / "__init__.py").read_text()


def test_publishing_is_trusted_publishing_with_attestations():
    publish = workflow_job("release.yml", "publish")
    assert publish["permissions"] == {"id-token": "write"} and publish["environment"]["name"] == "pypi"
    (step,) = [s for s in publish["steps"] if s.get("uses", "").startswith("pypa/gh-action-pypi-publish@")]
    assert step["with"] == {"attestations": True}  # no password, no token: OIDC
    assert workflow_job("release.yml", "build").get("permissions") is None  # the build job gets the workflow's read-only token
    text = (ROOT / ".github" / "workflows" / "release.yml").read_text()
    assert "secrets." not in text and "password" not in text


def test_the_sbom_step_describes_the_serve_environment_next_to_the_wheel(release_build, tmp_path):
    "The SBOM step on the built wheel: a CycloneDX document named after the wheel, listing the [serve] environment at constraints.txt's versions."
    import json
    import os

    serve = tmp_path / "serve" / "bin"  # its own RUNNER_TEMP: the install tests' real [serve] environment is left alone
    serve.mkdir(parents=True)
    (serve / "python").write_text(f'#!/bin/sh\nexec "{BIN / "python"}" "$@"\n')  # .venv stands in for the fresh [serve] environment
    (serve / "python").chmod(0o755)
    proc = run_workflow_step(
        workflow_step("release.yml", "build", "SBOM of the [serve] environment"),
        release_build,
        {"RUNNER_TEMP": str(tmp_path), "PATH": f"{BIN}:{os.environ['PATH']}"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [sbom] = (release_build / "sbom").iterdir()
    assert sbom.name == f"mlops_basics-{version()}-py3-none-any.serve.cdx.json"
    document = json.loads(sbom.read_text())
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"].startswith("1.")
    normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # PEP 503 names
    components = {normal(c["name"]): c["version"] for c in document["components"]}
    pins = {normal(k): v for k, v in (line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line)}
    for name in ("onnxruntime", "fastapi", "uvicorn", "tokenizers", "prometheus-client"):
        assert components[name] == pins[name], name
