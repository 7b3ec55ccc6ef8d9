"""The CoLA loader from outside: real HTTP downloads from a local server, the shared copy, and bad data."""

import http.server
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from functools import partial

import pytest

from mlops_basics.core.data import CACHE_ENV_VAR, COLA_ENV_VAR, COLA_ZIP_SHA256, ColaDataError, download_cola, load_cola, read_cola_files, sha256_file


@pytest.fixture()
def http_server(tmp_path):
    "A static file server on 127.0.0.1 serving `tmp_path/'www'`; yields its base URL."
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_download_over_http_is_verified_and_cached(http_server, cola_zip, tmp_path):
    url, www = http_server
    (www / "cola_public_1.1.zip").write_bytes(cola_zip.read_bytes())
    cached = download_cola(f"{url}/cola_public_1.1.zip", cache_dir=tmp_path / "cache")
    assert sha256_file(cached) == COLA_ZIP_SHA256
    (www / "cola_public_1.1.zip").unlink()  # the second call must not need the server
    assert download_cola(f"{url}/cola_public_1.1.zip", cache_dir=tmp_path / "cache") == cached
    splits = load_cola(cached)
    assert (len(splits.train), len(splits.validation)) == (8551, 1043)


def test_truncated_download_fails_and_leaves_no_file(http_server, cola_zip, tmp_path):
    url, www = http_server
    (www / "cola_public_1.1.zip").write_bytes(cola_zip.read_bytes()[:100_000])
    with pytest.raises(ColaDataError, match="sha256 mismatch"):
        download_cola(f"{url}/cola_public_1.1.zip", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_unreachable_server_says_how_to_work_offline(tmp_path):
    with pytest.raises(ColaDataError, match=COLA_ENV_VAR):
        download_cola("http://127.0.0.1:9/cola_public_1.1.zip", cache_dir=tmp_path, timeout=5)


def test_env_var_points_at_local_copy(cola_path, monkeypatch):
    monkeypatch.setenv(COLA_ENV_VAR, str(cola_path))
    assert load_cola().source == str(cola_path)


@pytest.mark.parametrize("form", ["zip", "raw"])
def test_a_copy_from_the_env_var_is_found_by_later_shells_without_it(form, cola_zip, cola_raw, tmp_path):
    "A run with $MLOPS_COLA_PATH caches the verified copy; a later process without the variable (and offline) reads it from there."
    copy = tmp_path / ("cola_public_1.1.zip" if form == "zip" else "raw")
    if form == "zip":
        shutil.copy(cola_zip, copy)
    else:
        shutil.copytree(cola_raw, copy, ignore=shutil.ignore_patterns("*.zip"))  # raw TSVs only
    env = {k: v for k, v in os.environ.items() if k != COLA_ENV_VAR} | {CACHE_ENV_VAR: str(tmp_path / "cache")}
    read = [sys.executable, "-c", "from mlops_basics.core.data import load_cola; s = load_cola(); print(len(s.train), s.source)"]
    first = subprocess.run(read, env={**env, COLA_ENV_VAR: str(copy)}, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    shutil.rmtree(copy) if copy.is_dir() else copy.unlink()  # the later shell has only the cache
    later = subprocess.run(read, env={**env, "https_proxy": "http://127.0.0.1:9"}, capture_output=True, text=True, timeout=120)
    assert later.returncode == 0, later.stderr[-2000:]
    assert later.stdout.split()[0] == "8551" and later.stdout.split()[1].startswith(str(tmp_path / "cache"))


def test_zip_and_directory_give_the_same_splits(cola_raw, cola_zip):
    from_zip, from_dir = load_cola(cola_zip), load_cola(cola_raw)
    assert from_zip.data_sha256 == from_dir.data_sha256
    assert from_zip.train == from_dir.train and from_zip.validation == from_dir.validation


def test_zip_without_a_member_names_it(cola_zip, tmp_path):
    with zipfile.ZipFile(cola_zip) as zin, zipfile.ZipFile(tmp_path / "partial.zip", "w") as zout:
        for item in zin.infolist():
            if "out_of_domain" not in item.filename:
                zout.writestr(item, zin.read(item.filename))
    with pytest.raises(ColaDataError, match=r"partial.zip: the zip has no raw/out_of_domain_dev.tsv"):
        read_cola_files(tmp_path / "partial.zip")
