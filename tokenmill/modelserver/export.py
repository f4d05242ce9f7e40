"""torch -> ONNX export with dynamic batch (and sequence) axes and named inputs/outputs.

``export_module`` takes any nn.Module; ``bundled_export_spec`` / ``hf_export_spec`` describe the shipped models.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tokenmill.modelserver import bundled

DEFAULT_OPSET = 17


@dataclass
class ExportSpec:
    """What to export: the module, example inputs by name, output names, and which axes are dynamic."""

    module: nn.Module
    example_inputs: dict[str, torch.Tensor]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    task: str = "generic"  # "image_classification" | "text_classification" | "generic"
    extra: dict = field(default_factory=dict)


def export_module(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor] | tuple[torch.Tensor, ...],
    path: str | Path,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``module`` to ONNX at ``path``; axis 0 of every input and output is dynamic unless told otherwise."""
    if isinstance(example_inputs, dict):
        input_names = list(example_inputs)
        args = tuple(example_inputs.values())
    else:
        args = tuple(example_inputs)
        input_names = [f"input_{i}" for i in range(len(args))]
    with torch.no_grad():
        sample = module(*args)
    num_outputs = len(sample) if isinstance(sample, (tuple, list)) else 1
    output_names = output_names or [f"output_{i}" for i in range(num_outputs)]
    if len(output_names) != num_outputs:
        raise ValueError(f"output_names has {len(output_names)} names but the module returns {num_outputs} outputs")
    if dynamic_axes is None:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter warns on every traced shape read; the validation step is the real check.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,  # the dynamo exporter needs onnxscript, which this install does not carry
        )
    return path


def text_example_inputs(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.int64),
        "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.int64),
    }


TEXT_AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}


def bundled_export_spec(name: str, hf_dir: Path | None = None) -> ExportSpec:
    """``classifier`` (EfficientNet-Lite0) or ``sentiment`` (MiniLM + shipped head; ``hf_dir`` = a copy of MiniLM)."""
    if name == "classifier":
        example = {"images": torch.randn(2, 3, bundled.IMAGE_SIZE, bundled.IMAGE_SIZE)}
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
        return ExportSpec(bundled.efficientnet_lite0(), example, ["logits"], axes, task="image_classification",
                          extra={"torch_model": "classifier"})
    if name == "sentiment":
        hf_dir = Path(hf_dir) if hf_dir else bundled.minilm_dir()
        tokenizer = bundled.load_tokenizer(hf_dir)
        example = text_example_inputs(tokenizer, ["a fine example", "another, somewhat longer example sentence"])
        axes = dict(TEXT_AXES, logits={0: "batch"})
        extra = {"tokenizer_dir": str(hf_dir), "labels": list(bundled.SENTIMENT_LABELS), "torch_model": "sentiment"}
        model = bundled.sentiment_model(hf_dir)
        return ExportSpec(model, example, ["logits"], axes, task="text_classification", extra=extra)
    raise ValueError(f"bundled model must be 'classifier' or 'sentiment', got {name!r}")


def hf_export_spec(hf_dir: Path, head_path: Path | None = None) -> ExportSpec:
    """A HF BERT-family directory: sequence-classification logits if it has a head, else pooled embeddings."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    hf_dir = Path(hf_dir)
    tokenizer = bundled.load_tokenizer(hf_dir)
    example = text_example_inputs(tokenizer, ["a fine example", "another, somewhat longer example sentence"])
    config = AutoConfig.from_pretrained(str(hf_dir))
    extra: dict = {"tokenizer_dir": str(hf_dir)}
    if head_path is not None:
        head, record = bundled.load_head(head_path)
        module: nn.Module = bundled.MeanPoolClassifier(bundled.load_encoder(hf_dir), head)
        extra["labels"] = record["labels"]
        output, task = "logits", "text_classification"
    elif any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
        hf_model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), attn_implementation="eager")
        module = _LogitsOnly(hf_model.eval())
        extra["labels"] = [config.id2label[i] for i in range(config.num_labels)]
        output, task = "logits", "text_classification"
    else:
        module = _Embedder(bundled.load_encoder(hf_dir))
        output, task = "embeddings", "generic"
    axes = dict(TEXT_AXES, **{output: {0: "batch"}})
    return ExportSpec(module.eval(), example, [output], axes, task=task, extra=extra)


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _Embedder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.pool = bundled.MeanPoolClassifier(encoder, nn.Identity())  # type: ignore[arg-type]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool.embed(input_ids, attention_mask)


def export_spec(spec: ExportSpec, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    return export_module(spec.module, spec.example_inputs, path, spec.output_names, spec.dynamic_axes, opset)
