"""``tokenmill bench-model`` on an .onnx file (TensorRT skipped cleanly without the package), and ``export --hf-dir``
on tiny random BERT directories (encoder -> embeddings, sequence classifier -> logits)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from tokenmill.cli import main
from tokenmill.modelserver.backends import tensorrt_available
from tokenmill.modelserver.bundled import minilm_dir
from tokenmill.modelserver.export import export_module
from tokenmill.modelserver.model_config import ModelConfig


def test_bench_model_cli_on_onnx_file(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    path = export_module(module, {"x": torch.randn(2, 16)}, tmp_path / "mlp.onnx", output_names=["y"])
    out = tmp_path / "bench.json"
    code = main(["bench-model", "--model", str(path), "--backends", "onnxruntime,tensorrt,torch", "--batch-sizes", "1,4",
                 "--iterations", "5", "--warmup", "1", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["batch_size"] for r in report["results"]] == [1, 4]
    row = report["results"][1]
    assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["throughput_per_s"] > 0
    if not tensorrt_available():
        assert "not installed" in report["skipped"]["tensorrt"]
    assert "torch" in report["skipped"]  # an .onnx file has no nn.Module to run
    assert report["command"].startswith("tokenmill bench-model --model ") and report["date"]


def tiny_bert_dir(path, classifier: bool):
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3,
                        id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(0)
    model = (BertForSequenceClassification if classifier else BertModel)(config)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_bytes((minilm_dir() / "tokenizer.json").read_bytes())
    return path


@pytest.mark.parametrize("classifier", [False, True])
def test_export_hf_dir(tmp_path, classifier):
    hf_dir = tiny_bert_dir(tmp_path / "bert", classifier)
    repo = tmp_path / "repo"
    code = main(["export", "--hf-dir", str(hf_dir), "--name", "tinybert", "--repository", str(repo),
                 "--variants", "fp16"])
    assert code == 0
    report = json.loads((repo / "tinybert" / "export_report.json").read_text())
    assert report["validation"]["max_abs"] <= 1e-4
    config = ModelConfig.load(repo / "tinybert" / "config.yaml")
    output = config.outputs[0]
    if classifier:
        assert (output.name, output.dims) == ("logits", [3])
        assert config.task.kind == "text_classification" and config.task.labels == ["a", "b", "c"]
    else:
        assert (output.name, output.dims) == ("embeddings", [32])
    assert [s.name for s in config.inputs] == ["input_ids", "attention_mask"]


def near_tie_classifier_dir(path):
    """A tiny BERT classifier whose three logit rows differ by ~1e-5: INT8 rounds them to one row, so its top-1
    disagrees with fp32 (measured: agreement 0.000), a variant that must fail --min-top1-agreement."""
    hf_dir = tiny_bert_dir(path, classifier=True)
    model = BertForSequenceClassification.from_pretrained(hf_dir)
    with torch.no_grad():
        weight = model.classifier.weight
        weight[1:] = weight[0] + 1e-5 * torch.randn_like(weight[1:])
        model.classifier.bias.zero_()
    model.save_pretrained(hf_dir)
    return hf_dir


@pytest.mark.parametrize(("extra", "code", "int8_kept"), [
    ([], 3, False),  # a variant below its agreement threshold fails the export (issue 25) ...
    (["--keep-failed-variants"], 0, True),  # ... unless the user asks to keep it
    (["--atol", "1e-12"], 1, False),  # the fp32 graph itself outside --atol: no config.yaml, exit 1
])  # fmt: skip
def test_export_exit_status_when_validation_fails(tmp_path, capsys, extra, code, int8_kept):
    hf_dir = near_tie_classifier_dir(tmp_path / "bert")
    repo = tmp_path / "repo"
    assert main(["export", "--hf-dir", str(hf_dir), "--name", "tie", "--repository", str(repo),
                 "--variants", "int8", *extra]) == code  # fmt: skip
    assert (repo / "tie" / "1" / "model.int8.onnx").is_file() == int8_kept
    assert (repo / "tie" / "config.yaml").is_file() == (code != 1)
    err = capsys.readouterr().err
    if code == 3:
        assert "tie int8" in err and "exit status 3" in err
    if code == 1:
        assert "FAILED validation" in err
