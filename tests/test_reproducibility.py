"""Same inputs, same bits: the tiny model trained twice with one seed and config has the same weights, and exporting it
twice gives the same ONNX bytes (fp32 and int8) and the same parity figures. Another seed gives other weights, so the
equality is not vacuous. (Across thread counts and CPU kinds the bits differ: see benchmarks/reproducibility.py.)"""

import hashlib
import json
from pathlib import Path

import pytest

from mlops_basics.devtools.test_utils import TINY_TRAIN, run_cli

pytestmark = pytest.mark.slow
FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")
SERVING_FILES = ("model.onnx", "model.int8.onnx", "tokenizer.json")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_and_export(root: Path, *overrides: str) -> tuple[Path, Path]:
    "`mlops-train` (tiny model, one thread, a few batches) into root/model, then `mlops-export` into root/serving."
    trained = run_cli(
        "mlops-train", *TINY_TRAIN, "trainer.max_epochs=1", "trainer.limit_train_batches=12", f"paths.root={root}", *overrides, cwd=root.parent
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = run_cli("mlops-export", root / "model", root / "serving")
    assert exported.returncode == 0, exported.stderr[-3000:]
    return root / "model", root / "serving"


def without_run_details(meta: dict) -> dict:
    "Metadata less what names this run rather than its result: when, where, how long."
    meta = json.loads(json.dumps(meta))
    meta.pop("created_at", None)
    meta.get("config", {}).pop("paths", None)
    for epoch in meta.get("history", []):
        epoch.pop("elapsed_s", None)
    for key in ("model_dir", "created_at"):
        meta.get("source", {}).pop(key, None)
    return meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("reproducibility")
    return {
        name: train_and_export(work / name, *overrides) for name, overrides in {"first": (), "second": (), "other_seed": ("training.seed=7",)}.items()
    }


def test_same_seed_and_config_give_the_same_weights(runs):
    (first, _), (second, _) = runs["first"], runs["second"]
    assert {f: sha256(first / f) for f in FILES} == {f: sha256(second / f) for f in FILES}
    meta = lambda d: without_run_details(json.loads((d / "metadata.json").read_text()))
    assert meta(first) == meta(second)


def test_the_same_weights_export_to_the_same_onnx_bytes(runs, tmp_path):
    (first_model, first), (_, second) = runs["first"], runs["second"]
    again = tmp_path / "again"
    assert run_cli("mlops-export", first_model, again).returncode == 0  # the very same weights, exported a second time
    for other in (second, again):
        assert {f: sha256(first / f) for f in SERVING_FILES} == {f: sha256(other / f) for f in SERVING_FILES}, other
        meta = lambda d: without_run_details(json.loads((d / "metadata.json").read_text()))
        assert meta(first)["variants"] == meta(other)["variants"]  # parity figures (max |Δlogit|, int8 agreement) included


def test_another_seed_gives_other_weights(runs):
    (first, first_serving), (other, other_serving) = runs["first"], runs["other_seed"]
    assert sha256(first / "model.safetensors") != sha256(other / "model.safetensors")
    assert sha256(first_serving / "model.onnx") != sha256(other_serving / "model.onnx")
