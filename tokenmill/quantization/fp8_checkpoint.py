"""Write an FP8 (e4m3) checkpoint from a dense Hugging Face directory, in vLLM's ``fp8`` format or as
compressed-tensors ``float-quantized``: every decoder linear's weight rounded per tensor or per output channel,
static input scales (optional) from calibration prompts run through the dense model. lm_head and the
embeddings stay dense. ``tokenmill quantize --method fp8`` and the tests (checkpoints as real tools write them)
use it; no new tensor layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tokenmill.kernels.fp8_quant import FP8_E4M3_MAX, quantize_fp8

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "vocab.json", "merges.txt", "chat_template.jinja")


def _input_amax(model: torch.nn.Module, names: list[str], prompts: list[list[int]]) -> dict[str, float]:
    """Largest |input| each named linear sees over the calibration prompts (static activation scales)."""
    amax = dict.fromkeys(names, 0.0)
    modules = dict(model.named_modules())
    hooks = []
    for name in names:
        def hook(_module, args, _name=name):
            amax[_name] = max(amax[_name], args[0].detach().abs().max().item())
        hooks.append(modules[name].register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in prompts:
            model(torch.tensor([ids]))
    for handle in hooks:
        handle.remove()
    return amax


def write_fp8_checkpoint(
    source: Path, target: Path, fmt: str = "fp8", weight_strategy: str = "tensor",
    calibration_prompts: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize the HF directory ``source`` into ``target``; returns the dequantized weights (name -> fp32 tensor)
    so callers can build the reference model. ``calibration_prompts`` given: static per-tensor input scales, else
    dynamic."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval()
    dequantized = save_fp8(model, target, fmt, weight_strategy, calibration_prompts)
    for file in _TOKENIZER_FILES:
        if (source / file).is_file():
            shutil.copy(source / file, target / file)
    return dequantized


def save_fp8(
    model: torch.nn.Module, target: Path, fmt: str = "fp8", weight_strategy: str = "tensor",
    calibration_prompts: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """Write a loaded transformers model's FP8 checkpoint (model.safetensors + config.json, no tokenizer files)
    into ``target``; returns the dequantized decoder weights (name -> fp32 tensor)."""
    from safetensors.torch import save_file

    if fmt not in ("fp8", "compressed-tensors"):
        raise ValueError(f"FP8 checkpoint format {fmt!r} is not supported; supported: fp8, compressed-tensors")
    if weight_strategy not in ("tensor", "channel") or (fmt == "fp8" and weight_strategy != "tensor"):
        raise ValueError("weight scales: 'tensor' (both formats) or 'channel' (compressed-tensors only)")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    amax = _input_amax(model, linears, calibration_prompts) if calibration_prompts else None
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    dequantized: dict[str, torch.Tensor] = {}
    for name in linears:
        weight = state[f"{name}.weight"]
        q, scale = quantize_fp8(weight, dim=1 if weight_strategy == "channel" else None)
        state[f"{name}.weight"] = q
        dequantized[f"{name}.weight"] = q.float() * scale
        # vLLM's fp8: a scalar per tensor; compressed-tensors: [1] per tensor, [out, 1] per channel.
        state[f"{name}.weight_scale"] = scale.reshape(() if fmt == "fp8" else (-1, 1) if scale.dim() else (1,))
        if amax is not None:
            value = torch.tensor(max(amax[name], 1e-6) / FP8_E4M3_MAX, dtype=torch.float32)
            state[f"{name}.input_scale"] = value.reshape(() if fmt == "fp8" else (1,))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    target.mkdir(parents=True, exist_ok=True)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = _quant_config(fmt, weight_strategy, static=amax is not None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def _quant_config(fmt: str, weight_strategy: str, static: bool) -> dict[str, Any]:
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
                "ignored_layers": ["lm_head"]}
    activations = ({"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
                   if static else
                   {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True})
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": weight_strategy, "dynamic": False,
                        "symmetric": True},
            "input_activations": activations,
        }},
        "ignore": ["lm_head"],
    }
