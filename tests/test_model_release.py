"""The published model from outside: `mlops-model pack`, then `mlops-model fetch` over real HTTP from a server on 127.0.0.1."""

import http.server
import io
import json
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest

from conftest import run_workflow_step, workflow_step
from mlops_basics.core.data import sha256_file
from mlops_basics.devtools.test_utils import http as request, run_cli, serve, tiny_serving_dir
from mlops_basics.ops.models.release_asset import ASSET_NAME, release_url


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    "The tiny model packed by the deploy workflow's own step, in a web root as a release lays it out: (serving dir, web root, sha256)."
    work = tmp_path_factory.mktemp("release")
    serving = tiny_serving_dir(work / "artifacts" / "serving")
    proc = run_workflow_step(workflow_step("deploy.yml", "publish-model", "Pack the serving model"), work, {}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (work / "www").mkdir()
    (work / "dist-model").rename(work / "www" / "v0.1.0")
    return serving, work / "www", proc.stdout.strip()


@pytest.fixture(scope="module")
def web(published):
    "A static file server on 127.0.0.1 over the web root; yields its base URL."
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(published[1]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def files(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_pack_is_reproducible_and_publishes_its_sha256(published, tmp_path):
    serving, www, digest = published
    assert (www / "v0.1.0" / f"{ASSET_NAME}.sha256").read_text() == f"{digest}  {ASSET_NAME}\n"
    assert sha256_file(www / "v0.1.0" / ASSET_NAME) == digest
    again = run_cli("mlops-model", "pack", serving, tmp_path)
    assert again.returncode == 0 and again.stdout.strip() == digest


def test_fetch_over_http_installs_what_was_packed_and_it_serves(published, web, tmp_path):
    serving, _, _ = published
    proc = run_cli("mlops-model", "fetch", "--url", f"{web}/v0.1.0/{ASSET_NAME}", "--out", tmp_path / "artifacts" / "serving")
    assert proc.returncode == 0, proc.stderr
    assert files(tmp_path / "artifacts" / "serving") == files(serving)
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["serving"]  # no download or staging left
    with serve("--serving-dir", tmp_path / "artifacts" / "serving", log=tmp_path / "serve.log") as url:
        status, _, body = request(
            "POST", f"{url}/predict", json.dumps({"sentences": ["The book was read by the student."]}).encode(), {"Content-Type": "application/json"}
        )
    assert status == 200 and len(json.loads(body)["predictions"]) == 1, body


def test_default_url_is_this_versions_release_asset():
    from mlops_basics import __version__

    assert release_url() == f"https://github.com/mlops-basics/mlops-basics/releases/download/v{__version__}/{ASSET_NAME}"


def test_wrong_sha256_leaves_nothing_and_keeps_the_old_model(published, web, tmp_path):
    serving, _, digest = published
    out = tmp_path / "artifacts" / "serving"
    assert run_cli("mlops-model", "fetch", "--url", f"{web}/v0.1.0/{ASSET_NAME}", "--out", out).returncode == 0
    before = files(out)
    bad = digest[::-1]
    proc = run_cli("mlops-model", "fetch", "--url", f"{web}/v0.1.0/{ASSET_NAME}", "--sha256", bad, "--out", out)
    assert proc.returncode == 1 and "sha256 mismatch" in proc.stderr and bad in proc.stderr
    assert files(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["serving"]


def test_missing_asset_and_bad_checksum_file_are_clear_errors(published, web, tmp_path):
    proc = run_cli("mlops-model", "fetch", "--url", f"{web}/v9.9.9/{ASSET_NAME}", "--out", tmp_path / "new" / "serving")
    assert proc.returncode == 1 and "could not download" in proc.stderr and "404" in proc.stderr
    assert not (tmp_path / "new").exists()
    (published[1] / "garbled").mkdir(exist_ok=True)
    (published[1] / "garbled" / ASSET_NAME).write_bytes(b"x")
    (published[1] / "garbled" / f"{ASSET_NAME}.sha256").write_text("<html>not found</html>")
    proc = run_cli("mlops-model", "fetch", "--url", f"{web}/garbled/{ASSET_NAME}", "--out", tmp_path / "new" / "serving")
    assert proc.returncode == 1 and "does not hold a sha256" in proc.stderr and not (tmp_path / "new").exists()


def archive_with(www: Path, name: str, members: dict[str, bytes | str]) -> str:
    "A tar.gz of `members` (a file's bytes, or a symbolic link's target) published under `www/name/`; returns its sha256."
    (www / name).mkdir(exist_ok=True)
    with tarfile.open(www / name / ASSET_NAME, "w:gz") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return sha256_file(www / name / ASSET_NAME)


@pytest.mark.parametrize("case", ["tampered model", "path outside", "a link"])
def test_an_archive_that_verifies_but_is_wrong_inside_leaves_nothing(case, published, web, tmp_path):
    serving, www, _ = published
    members = {p.name: p.read_bytes() for p in serving.iterdir() if p.is_file()}
    if case == "tampered model":
        members["model.int8.onnx"] = members["model.int8.onnx"][:-10]
    elif case == "path outside":
        members["../../escaped.txt"] = b"outside"
    else:
        members["tokenizer.json"] = "/etc/passwd"  # a link out of the archive, in place of a model file
    digest = archive_with(www, case.replace(" ", "-"), members)
    proc = run_cli(
        "mlops-model", "fetch", "--url", f"{web}/{case.replace(' ', '-')}/{ASSET_NAME}", "--sha256", digest, "--out", tmp_path / "a" / "serving"
    )
    assert proc.returncode == 1 and "not a complete serving directory" in proc.stderr, proc.stderr
    assert ("refusing" in proc.stderr) == (case != "tampered model"), proc.stderr  # links and `..` stop before anything is unpacked
    assert list(tmp_path.iterdir()) == []
