"""Which layout a 4/8-bit weight-only linear keeps on the device (``--quant-weight-layout auto|gptq|kmajor``).

``gptq``: codes packed along K as loaded (kernels/wna16_gemm.py's PackedWeight), served by the split-K, tiled and
GEMV kernels of kernels/quant_dispatch.py. ``kmajor``: only kernels/w4_gemv.py's K-major repack (each output
channel's words contiguous along K; same bytes), served by the K-major GEMV (1-4 rows), the K-major tensor-core
GEMM and dequantize + cuBLAS (kernels/quant_dispatch.py: kmajor_cuda_linear). ``auto`` is ``AUTO_WEIGHT_LAYOUT``.
A layer the K-major kernels cannot serve keeps the GPTQ layout under ``auto`` (with the reason, logged once per
model) and fails at load when ``kmajor`` was asked for. vLLM has no such flag (it names repacked formats as
quantization methods, e.g. ``gptq_marlin``); ours keeps one method per checkpoint format.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.config import QUANT_WEIGHT_LAYOUTS
from tokenmill.kernels._triton import HAS_TRITON

logger = logging.getLogger(__name__)

# What ``auto`` means. kmajor since the H100 A/B of benchmarks/gpu_jobs.sh quant_e2e (2026-12-07, Llama-3-8B shape,
# rtn4): decode 1.82x / 1.18x / 0.74x the GPTQ layout's speed at batch 1 / 64 / 256, prefill 43k vs 7.7k tok/s.
AUTO_WEIGHT_LAYOUT = "kmajor"


@dataclass(frozen=True)
class LayoutChoice:
    """A layer's layout and, when it is not the one asked for, why."""

    layout: str  # "gptq" or "kmajor"
    reason: str = ""


def kmajor_unsupported(bits: int, group_size: int, dtype: torch.dtype, device: torch.device) -> str:
    """Why the K-major kernels cannot serve this weight ('' when they can). ``group_size`` is the layer's real
    group (K for one group). Act-order needs nothing: x's columns are permuted before any kernel."""
    if bits != 4:
        return f"{bits}-bit weights (the K-major kernels take 4-bit)"
    if device.type != "cuda":
        return f"weights on {device.type} (the K-major kernels are Triton GPU kernels)"
    if not HAS_TRITON:
        return "triton is not installed"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dtype} activations (the K-major kernels take bf16/fp16)"
    words = group_size // 8
    if group_size % 8 or words & (words - 1) or group_size < 16:
        return (f"group size {group_size} (the K-major kernels need 16, 32, 64, 128, ... input channels a group, "
                f"8 x a power of two words)")
    return ""


def choose_weight_layout(requested: str, bits: int, group_size: int, dtype: torch.dtype,
                         device: torch.device) -> LayoutChoice:
    """The layout a layer keeps: ``gptq`` as asked; ``kmajor`` where the kernels take the weight, else a
    ValueError naming why; ``auto`` resolves to AUTO_WEIGHT_LAYOUT and falls back to ``gptq`` with the reason."""
    if requested not in QUANT_WEIGHT_LAYOUTS:
        raise ValueError(f"quant_weight_layout must be one of {', '.join(QUANT_WEIGHT_LAYOUTS)}; got {requested!r}")
    wanted = AUTO_WEIGHT_LAYOUT if requested == "auto" else requested
    if wanted == "gptq":
        return LayoutChoice("gptq")
    reason = kmajor_unsupported(bits, group_size, dtype, device)
    if not reason:
        return LayoutChoice("kmajor")
    if requested == "kmajor":
        raise ValueError(f"--quant-weight-layout kmajor cannot serve {reason}; use --quant-weight-layout gptq "
                         f"(or auto, which falls back per layer)")
    return LayoutChoice("gptq", reason)


def report_weight_layouts(model: nn.Module, requested: str, log: bool = True) -> None:
    """One log line per loaded model (``log``: rank 0): how many quantized linears keep each layout, and the
    fallback reasons; ValueError (every rank) when ``kmajor`` was asked for and no linear has a layout to choose
    (e.g. FP8 weights)."""
    choices = [m.wna16_layout for m in model.modules() if isinstance(getattr(m, "wna16_layout", None), LayoutChoice)]
    if requested == "kmajor" and not any(c.layout == "kmajor" for c in choices):
        raise ValueError("--quant-weight-layout kmajor applies to 4-bit weight-only linears (gptq, awq, "
                         "compressed-tensors pack-quantized, rtn4); this model has none: use auto or gptq")
    if not choices or not log:
        return
    counts = Counter(c.layout for c in choices)
    reasons = sorted({c.reason for c in choices if c.reason})
    summary = ", ".join(f"{n} {layout}" for layout, n in sorted(counts.items()))
    logger.info("quantized weight layout: %s linears%s", summary,
                f" (gptq layout kept for: {'; '.join(reasons)})" if reasons else "")
