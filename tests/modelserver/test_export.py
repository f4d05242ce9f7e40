"""Acceptance 1: both bundled models export, simplify and validate (fp32 within 1e-4), FP16/INT8 agreement reported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tokenmill.modelserver.bundled import imagenet_labels
from tokenmill.modelserver.export import export_module
from tokenmill.modelserver.model_config import ModelConfig
from tokenmill.modelserver.simplify import simplify
from tokenmill.modelserver.validate import ValidationError, validate


@pytest.mark.parametrize("name", ["classifier", "sentiment"])
def test_export_validates_and_reports_variants(exported, name):
    report = exported["reports"][name]
    assert report["validation"]["max_abs"] <= 1e-4
    assert set(report["validation"]["cases"]) >= {"random", "real0"}
    assert report["nodes_after"] < report["nodes_before"]
    for variant in ("fp16", "int8"):
        result = report["variants"][variant]
        assert 0.0 <= result["top1_agreement"] <= 1.0
        assert result["eval_samples"] >= 18
    assert report["variants"]["fp16"]["top1_agreement"] >= 0.9  # fp16 must not change decisions
    repo = exported["repository"]
    assert (repo / name / "1" / "model.onnx").is_file()
    config = ModelConfig.load(repo / name / "config.yaml")
    assert config.max_batch_size > 0 and config.dynamic_batching is not None


def test_sentiment_report_has_accuracy(exported):
    fp16 = exported["reports"]["sentiment"]["variants"]["fp16"]
    assert fp16["reference_accuracy"] > 0.8  # the shipped head on held-out sentences
    assert fp16["accuracy"] is not None


def test_exported_graph_has_dynamic_axes(exported):
    graph = onnx.load(str(exported["repository"] / "sentiment" / "1" / "model.onnx")).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"][0] == "batch" and dims["input_ids"][1] == "sequence"


def test_export_module_api_and_validation_failure(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
    path = export_module(module, {"x": torch.randn(2, 8)}, tmp_path / "mlp.onnx", output_names=["y"])
    counts = simplify(path)
    assert counts.nodes_after <= counts.nodes_before
    feeds = {"case": {"x": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)}}
    assert validate(module, path, feeds).max_abs < 1e-5
    with torch.no_grad():
        module[2].bias.add_(1e-2)  # the graph no longer matches the module
    with pytest.raises(ValidationError, match="tolerance"):
        validate(module, path, feeds)


def test_imagenet_label_anchors():
    labels = imagenet_labels()
    assert (labels[281], labels[282], labels[285], labels[967]) == ("tabby", "tiger cat", "Egyptian cat", "espresso")
