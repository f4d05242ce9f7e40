"""Acceptance 1: both bundled models export, simplify and validate (fp32 within 1e-4), FP16/INT8 agreement reported."""

from __future__ import annotations

import logging

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


def test_variant_below_its_agreement_threshold_is_reported_and_not_kept(exported):
    # Issue 25: the classifier's INT8 graph (calibrated on 4 images) agrees with fp32 on top-1 for ~0.2 of the eval
    # images; such a variant must be named in a warning and its file must not stay in the repository to be served.
    failed = []
    for name, report in exported["reports"].items():
        for variant, result in report["variants"].items():
            path = exported["repository"] / name / "1" / f"model.{variant}.onnx"
            assert result["passed"] == (result["top1_agreement"] >= result["min_top1_agreement"])
            assert path.is_file() == result["passed"]
            if not result["passed"]:
                failed.append((name, variant))
        assert report["failed_variants"] == [v for v, r in report["variants"].items() if not r["passed"]]
    assert failed, "no variant failed its threshold, so this test checked nothing; lower the calibration size"
    for name, variant in failed:
        assert any(f"[{name}] {variant} FAILED validation" in line for line in exported["warnings"])


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


def test_int8_quantization_prints_no_onnxruntime_warnings(tmp_path, caplog):
    # Issue 25: quantizing MiniLM printed ~30 "Axis 1 is out-of-range for weight ... LayerNorm" lines through the
    # root logger. A LayerNorm's 1-D weight with per-channel INT8 reproduces the line on a graph that builds in ms.
    from tokenmill.modelserver.quantize import to_int8

    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    example = {"x": torch.randn(2, 8)}
    path = export_module(module, example, tmp_path / "tiny.onnx", output_names=["logits"])
    calibration = [{"x": np.random.default_rng(i).standard_normal((4, 8)).astype(np.float32)} for i in range(3)]
    with caplog.at_level(logging.WARNING):
        to_int8(path, tmp_path / "tiny.int8.onnx", calibration)
    assert (tmp_path / "tiny.int8.onnx").is_file()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
