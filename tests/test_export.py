"""ONNX export of the real architecture (all-MiniLM-L6-v2 with a classification head) on the whole validation set:
fp32 parity with PyTorch, int8 agreement reported, the `tokenizers` library matching transformers, and bad inputs."""
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    "all-MiniLM-L6-v2 with a fresh (seeded) head saved as training would, exported to a serving directory."
    import torch
    from mlops_basics.export import export_serving
    from mlops_basics.model import ColaClassifier, load_backbone, save_classifier
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("minilm")
    model, tokenizer = load_backbone("all-MiniLM-L6-v2", seed=0)
    save_classifier(ColaClassifier(model), tokenizer, work/"model", max_length=128, backbone="all-MiniLM-L6-v2")
    meta = export_serving(work/"model", work/"serving")
    return work, meta


def test_fp32_matches_pytorch_on_all_1043_sentences(minilm):
    _, meta = minilm
    fp32 = meta["variants"]["fp32"]
    assert meta["validation_sentences"] == 1043
    assert fp32["max_abs_logit_diff"] <= 1e-4 and fp32["agreement_with_pytorch"] == 1.0
    assert meta["fused_operators"]["Attention"] == 6  # one fused attention per layer: eager attention was exported


def test_int8_is_measured_and_recorded(minilm):
    _, meta = minilm
    int8 = meta["variants"]["int8"]
    assert 0.5 <= int8["agreement_with_fp32"] <= 1.0
    assert int8["mcc_change_vs_fp32"] == pytest.approx(int8["metrics"]["mcc"] - meta["variants"]["fp32"]["metrics"]["mcc"])
    assert int8["bytes"] < meta["variants"]["fp32"]["bytes"] / 3
    assert meta["default_variant"] in ("fp32", "int8")


def test_tokenizers_library_matches_transformers(minilm, cola_path):
    from transformers import AutoTokenizer
    from mlops_basics.data import load_cola
    from mlops_basics.predictor import encode_batch, load_tokenizer
    work, _ = minilm
    sentences = [e.sentence for e in load_cola(cola_path).validation]
    ours = encode_batch(load_tokenizer(work/"serving"/"tokenizer.json", 128), sentences)
    theirs = AutoTokenizer.from_pretrained(work/"model")(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    for key in ours: assert np.array_equal(ours[key], theirs[key]), key


def test_onnx_predictor_agrees_with_pytorch_predictor(minilm, cola_path):
    from mlops_basics.data import load_cola
    from mlops_basics.inference import Predictor
    from mlops_basics.predictor import ONNXPredictor
    work, _ = minilm
    sentences = [e.sentence for e in load_cola(cola_path).validation][:200]
    torch_probs = Predictor(work/"model").predict_proba(sentences)
    onnx_probs = ONNXPredictor(work/"serving", variant="fp32").predict_proba(sentences)
    assert np.abs(onnx_probs - torch_probs).max() < 1e-5
    assert (onnx_probs.argmax(1) == torch_probs.argmax(1)).all()


def test_mismatched_tokenizer_and_bad_files(minilm, tmp_path):
    from mlops_basics.artifacts import ArtifactsError
    from mlops_basics.predictor import ONNXPredictor
    work, _ = minilm
    broken = tmp_path/"serving"; shutil.copytree(work/"serving", broken)
    meta = json.loads((broken/"metadata.json").read_text()); meta["vocab_size"] = 1000  # as if the model knew a smaller vocabulary
    (broken/"metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactsError, match="tokenizer belongs to another model"): ONNXPredictor(broken)
    proc = run_cli("mlops-export", tmp_path/"no-model", tmp_path/"out")
    assert proc.returncode == 2 and "train a model first" in proc.stderr
