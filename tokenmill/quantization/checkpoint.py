"""Write a quantized model as a Hugging Face directory in the GPTQ or AWQ checkpoint convention (config.json
``quantization_config`` + per-linear qweight/qzeros/scales[/g_idx]), and read one back as dense weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from tokenmill.quantization.packing import QuantizedWeight, from_awq, from_gptq, to_awq, to_gptq
from tokenmill.quantization.quantizer import QuantizeConfig, QuantizeResult

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(config: QuantizeConfig) -> dict:
    """config.json's quantization_config, with the keys AutoGPTQ/GPTQModel and AutoAWQ write."""
    if config.checkpoint_format == "awq":
        return {"quant_method": "awq", "bits": config.bits, "group_size": config.group_size,
                "zero_point": True, "version": "gemm"}
    return {"quant_method": "gptq", "bits": config.bits, "group_size": config.group_size,
            "desc_act": config.act_order, "sym": bool(config.sym), "damp_percent": config.damp_percent,
            "true_sequential": False, "static_groups": False, "checkpoint_format": "gptq", "lm_head": config.lm_head,
            "quantizer": [f"tokenmill:{config.method}"]}


def compressed_tensors_config(config: QuantizeConfig) -> dict:
    """quantization_config of a pack-quantized checkpoint, built by the compressed-tensors package's own models
    (so the keys and defaults are the ones vLLM and llm-compressor read)."""
    try:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as exc:
        raise ValueError("--format compressed-tensors needs the compressed-tensors package: "
                         "pip install compressed-tensors") from exc
    grouped = config.group_size != -1
    args = QuantizationArgs(num_bits=config.bits, type="int", symmetric=bool(config.sym),
                            strategy="group" if grouped else "channel",
                            group_size=config.group_size if grouped else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format="pack-quantized",
                            quantization_status="compressed")
    return {**qc.model_dump(mode="json"), "quant_method": "compressed-tensors"}


def to_compressed_tensors(qw: QuantizedWeight, symmetric: bool) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear, packed by the compressed-tensors package (signed codes)."""
    from compressed_tensors.compressors import pack_to_int32

    offset = 2 ** (qw.bits - 1)
    tensors = {
        "weight_packed": pack_to_int32((qw.codes - offset).to(torch.int8), qw.bits),
        "weight_scale": qw.scales.t().contiguous().to(torch.float16),
        "weight_shape": torch.tensor(list(qw.codes.shape)),
    }
    if not symmetric:  # signed zero points packed along the output
        signed = (qw.zeros.t().to(torch.int64) - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(signed, qw.bits, packed_dim=0)
    return tensors


def save_quantized(model: nn.Module, tokenizer, result: QuantizeResult, config: QuantizeConfig,
                   out_dir: str | Path) -> Path:
    """model.safetensors (packed linears; the rest in the model's dtype), config.json, tokenizer files."""
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    fmt = config.checkpoint_format
    if fmt == "compressed-tensors":
        qconfig = compressed_tensors_config(config)

        def pack(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
            return to_compressed_tensors(qw, bool(config.sym))
    else:
        qconfig = quantization_config(config)
        pack = to_awq if fmt == "awq" else to_gptq
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in result.weights:
            continue
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = tensor.detach().contiguous().clone()
    for module, qw in result.weights.items():
        for suffix, tensor in pack(qw).items():
            tensors[f"{module}.{suffix}"] = tensor
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model_config = model.config.to_dict()
    model_config["quantization_config"] = qconfig
    model_config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(str(out))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(out))
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def dequantize_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A dense copy of a GPTQ/AWQ directory (weights = (q - zero) * scale): the reference the quantized model
    must match, loadable by transformers and by tokenmill's dense path."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    qconfig = config.pop("quantization_config")
    method, bits, group_size = qconfig["quant_method"], int(qconfig["bits"]), int(qconfig["group_size"])
    if method not in ("gptq", "awq"):
        raise ValueError(f"quant_method {method!r} is not gptq or awq")
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            raw.update({name: handle.get_tensor(name) for name in handle.keys()})
    dense: dict[str, torch.Tensor] = {}
    modules = {name.rsplit(".", 1)[0] for name in raw if name.endswith(".qweight")}
    for module in modules:
        parts = {s: raw.pop(f"{module}.{s}") for s in PACKED_SUFFIXES if f"{module}.{s}" in raw}
        qw = from_awq(parts, group_size) if method == "awq" else from_gptq(parts, bits)
        dense[f"{module}.weight"] = qw.dequantize().to(dtype).contiguous()
    dense.update({name: t.to(dtype) if t.is_floating_point() else t for name, t in raw.items()})
    dst.mkdir(parents=True, exist_ok=True)
    save_file(dense, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    copy_tokenizer_files(src, dst)
    return dst
