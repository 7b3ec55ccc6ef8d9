"""ONNX export of the default's real architecture (the grammar tagger's DistilBERT with a classification head) on the whole validation set:
fp32 parity with PyTorch, int8 agreement reported, the `tokenizers` library matching transformers, and bad inputs."""

import json
import shutil

import numpy as np
import pytest

from mlops_basics.devtools.test_utils import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    "The default backbone with a fresh (seeded) head saved as training would, exported to a serving directory."
    import torch

    from mlops_basics.training.backbones import load_backbone
    from mlops_basics.training.config import ModelConfig
    from mlops_basics.training.export import export_serving
    from mlops_basics.training.model import ColaClassifier, save_classifier

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("encoder")
    model, tokenizer = load_backbone(ModelConfig.backbone, seed=0)
    save_classifier(ColaClassifier(model), tokenizer, work / "model", max_length=128, backbone=ModelConfig.backbone)
    meta = export_serving(work / "model", work / "serving")
    return work, meta


def test_fp32_matches_pytorch_on_all_1043_sentences(encoder):
    import onnx

    from mlops_basics.core.artifacts import ARTIFACTS_FORMAT

    work, meta = encoder
    assert meta["format"] == ARTIFACTS_FORMAT
    assert meta["inputs"] == [i.name for i in onnx.load(work / "serving" / "model.onnx").graph.input]
    fp32 = meta["variants"]["fp32"]
    assert meta["validation_sentences"] == 1043
    assert fp32["max_abs_logit_diff"] <= 1e-4 and fp32["agreement_with_pytorch"] == 1.0
    config = json.loads((work / "model" / "config.json").read_text())
    layers = config.get("num_hidden_layers", config.get("n_layers"))
    fused = meta["fused_operators"]
    assert fused["BiasGelu"] == layers and fused["SkipLayerNormalization"] >= 2 * layers - 1  # one GELU and two norms a layer
    # ONNX Runtime fuses BERT's and DistilBERT's attention (eager attention was exported); MPNet's relative position bias it leaves unfused
    assert fused.get("Attention", 0) == (0 if config["model_type"] == "mpnet" else layers), fused


def matthews(labels: np.ndarray, predicted: np.ndarray) -> float:
    "Matthews correlation from the confusion counts (0 when a row or column of the matrix is empty)."
    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    denominator = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def onnx_predictions(model_file, tokenizer, sentences, batch_size: int = 64) -> np.ndarray:
    "Predicted labels of an ONNX file, run directly with ONNX Runtime on the batches export used (int8 quantises each batch's activations)."
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    predicted = []
    for start in range(0, len(sentences), batch_size):
        encoded = tokenizer(sentences[start : start + batch_size], padding=True, truncation=True, max_length=128, return_tensors="np")
        predicted.append(session.run(["logits"], {n: encoded[n].astype(np.int64) for n in names})[0].argmax(1))
    return np.concatenate(predicted)


def test_int8_is_measured_and_recorded(encoder, cola_path):
    "The recorded metrics are what the shipped files predict, and the default variant follows the 0.01 MCC rule."
    from transformers import AutoTokenizer

    from mlops_basics.core.data import load_cola

    work, meta = encoder
    validation = load_cola(cola_path).validation
    sentences, labels = [e.sentence for e in validation], np.array([e.label for e in validation])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    predicted = {v: onnx_predictions(work / "serving" / meta["variants"][v]["file"], tokenizer, sentences) for v in ("fp32", "int8")}
    mcc = {v: matthews(labels, p) for v, p in predicted.items()}
    fp32, int8 = meta["variants"]["fp32"], meta["variants"]["int8"]
    assert fp32["metrics"]["mcc"] == pytest.approx(mcc["fp32"], abs=1e-9) and int8["metrics"]["mcc"] == pytest.approx(mcc["int8"], abs=1e-9)
    assert int8["mcc_change_vs_fp32"] == pytest.approx(mcc["int8"] - mcc["fp32"], abs=1e-9)
    assert int8["agreement_with_fp32"] == pytest.approx((predicted["int8"] == predicted["fp32"]).mean())
    assert int8["bytes"] < fp32["bytes"] / (3 if int8["method"] == "dynamic" else 1.4)  # blockwise keeps the embedding table in float
    assert meta["default_variant"] == ("int8" if mcc["fp32"] - mcc["int8"] <= 0.01 else "fp32")


def test_tokenizers_library_matches_transformers(encoder, cola_path):
    from transformers import AutoTokenizer

    from mlops_basics.core.data import load_cola
    from mlops_basics.serving.predictor import encode_batch, load_tokenizer

    work, _ = encoder
    sentences = [e.sentence for e in load_cola(cola_path).validation]
    ours = encode_batch(load_tokenizer(work / "serving" / "tokenizer.json", 128), sentences)
    theirs = AutoTokenizer.from_pretrained(work / "model")(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    for key in theirs:
        assert np.array_equal(ours[key], theirs[key]), key  # every input the model's tokenizer makes (DistilBERT's has no token_type_ids)


def test_onnx_predictor_agrees_with_pytorch_predictor(encoder, cola_path):
    from mlops_basics.core.data import load_cola
    from mlops_basics.serving.predictor import ONNXPredictor
    from mlops_basics.training.inference import Predictor

    work, _ = encoder
    sentences = [e.sentence for e in load_cola(cola_path).validation][:200]
    torch_probs = Predictor(work / "model").predict_proba(sentences)
    onnx_probs = ONNXPredictor(work / "serving", variant="fp32").predict_proba(sentences)
    assert np.abs(onnx_probs - torch_probs).max() < 1e-5
    assert (onnx_probs.argmax(1) == torch_probs.argmax(1)).all()


def test_mismatched_tokenizer_and_bad_files(encoder, tmp_path):
    from mlops_basics.core.artifacts import ArtifactsError
    from mlops_basics.serving.predictor import ONNXPredictor

    work, _ = encoder
    broken = tmp_path / "serving"
    shutil.copytree(work / "serving", broken)
    meta = json.loads((broken / "metadata.json").read_text())
    meta["vocab_size"] = 1000  # as if the model knew a smaller vocabulary
    (broken / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactsError, match="tokenizer belongs to another model"):
        ONNXPredictor(broken)
    proc = run_cli("mlops-export", tmp_path / "no-model", tmp_path / "out")
    assert proc.returncode == 2 and "train a model first" in proc.stderr
