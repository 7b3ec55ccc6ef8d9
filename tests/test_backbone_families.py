"""Every config option on every supported encoder family (BERT, DistilBERT, MPNet): dropout, layer decay, re-initialised top layers and
token types, from `load_backbone` through `mlops-train` and `mlops-export` to the ONNX predictor."""

import json

import numpy as np
import onnx
import pytest
import torch

from mlops_basics.core.artifacts import read_metadata
from mlops_basics.devtools.test_utils import TINY_TRAIN, run_cli
from mlops_basics.training.backbones import ENCODER_FAMILIES, load_backbone
from mlops_basics.training.export import products_after_gelu, runtime_operators
from mlops_basics.training.model import collate, encode, encoder_layers, parameter_groups, reinit_top_layers

FAMILIES = {"bert": "tiny-random-bert", "distilbert": "tiny-random-distilbert", "mpnet": "tiny-random-mpnet"}


def test_every_family_has_a_tiny_backbone():
    assert set(FAMILIES) == set(ENCODER_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_options_act_on_the_family(family):
    "Dropout reaches the family's own keys, layer decay finds every layer, re-initialising touches only the top, token types only where taken."
    model, tokenizer = load_backbone(FAMILIES[family], dropout=0.25)
    assert model.config.model_type == family
    assert all(getattr(model.config, key) == 0.25 for key in ENCODER_FAMILIES[family])
    assert 0.25 in {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}

    n = model.config.num_hidden_layers
    groups = parameter_groups(model, 1e-3, 0.01, layer_decay=0.5)
    depth = {id(p): g["depth"] for g in groups for p in g["params"]}
    assert sorted({g["depth"] for g in groups}) == list(range(n + 2))  # embeddings, every layer, the head
    for i, layer in enumerate(encoder_layers(model)):
        assert {depth[id(p)] for p in layer.parameters()} == {i + 1}
    head = {depth[id(p)] for name, p in model.named_parameters() if not name.startswith(f"{model.base_model_prefix}.")}
    assert head == {n + 1}
    if family == "mpnet":  # shared by every layer: learns with the embeddings
        assert depth[id(model.mpnet.encoder.relative_attention_bias.weight)] == 0
    assert {round(g["lr"], 8) for g in groups} == {round(1e-3 * 0.5 ** (n + 1 - d), 8) for d in range(n + 2)}

    before = [[p.clone() for p in layer.parameters()] for layer in encoder_layers(model)]
    reinit_top_layers(model, 1)
    after = [list(layer.parameters()) for layer in encoder_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert not all(torch.equal(a, b) for a, b in zip(before[-1], after[-1]))

    batch = collate(encode(tokenizer, ["The book was read.", "Book the the."], 32, [1, 0]), tokenizer.pad_token_id)
    assert ("token_type_ids" in batch) == (family == "bert")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_export_every_family(family, tmp_path):
    "`mlops-train` with every option set, then `mlops-export`: the ONNX graph takes token types only for BERT, and the predictor copes."
    from mlops_basics.serving.predictor import ONNXPredictor

    options = ["model.dropout=0.2", "training.layer_decay=0.8", "training.reinit_layers=1"]
    proc = run_cli(
        "mlops-train",
        *TINY_TRAIN,
        f"model.backbone={FAMILIES[family]}",
        *options,
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        f"paths.root={tmp_path}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = read_metadata(tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == family
    assert meta["backbone_source"]["random_init"]["model_type"] == family
    proc = run_cli("mlops-export", tmp_path / "model", tmp_path / "serving", "--int8", "static")
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictor = ONNXPredictor(tmp_path / "serving")
    assert ("token_type_ids" in predictor.input_names) == (family == "bert")
    probs = predictor.predict_proba(["The book was read by the student.", "Book the the read."])
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # static int8 multiplies in int8 on every family: each weight product but the GELU-fed ones becomes MatMulIntegerToFloat
    assert read_metadata(tmp_path / "serving")["variants"]["int8"]["method"] == "static"
    ops = runtime_operators(tmp_path / "serving" / "model.int8.onnx")
    after_gelu = products_after_gelu(onnx.load(str(tmp_path / "serving" / "model.onnx")))
    assert ops["MatMulNBits"] == len(after_gelu) > 0 and ops["MatMulIntegerToFloat"] >= len(after_gelu) and ops["MatMul"] == 0, ops
