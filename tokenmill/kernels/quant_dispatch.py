"""Which kernel a quantized linear runs on CUDA, per row count: the split-K streaming kernels
(kernels/wna16_splitk.py, fp8_gemv.py), the tiled wna16 kernel, or (FP8) ``torch._scaled_mm``.

In order: a layer's ``gemm_plan`` (rows rounded up to a power of two -> config; a tuner's), then the measured
winners for this device and weight shape (a JSON table written by benchmarks/gpu_quant_gemv_sweep.py: the one
shipped in kernels/configs/, or the file ``TOKENMILL_QUANT_GEMV_CONFIGS`` names, like vLLM's tuned MoE configs),
then the defaults below: per-row FMA streaming for 1-4 rows, tensor-core streaming to 16, the tiled kernel above,
split over K until the output tiles times the splits fill the GPU twice.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

from tokenmill.kernels._triton import next_power_of_2
from tokenmill.kernels.splitk import SplitKConfig
from tokenmill.kernels.wna16_gemm import PackedWeight, WNA16Config, wna16_linear
from tokenmill.kernels.wna16_splitk import wna16_splitk_linear

FP8_GEMV_MAX_ROWS = 16  # above: torch._scaled_mm (tensor-core FP8) is faster
WNA16_FMA_MAX_ROWS = 4  # above: tensor-core products (rows pad to 16)

Plan = dict[int, SplitKConfig | WNA16Config | None]  # None: the format's library path (FP8: _scaled_mm)
Choice = SplitKConfig | WNA16Config | None

SHIPPED_CONFIGS = Path(__file__).parent / "configs" / "quant_gemv.json"
CONFIGS_ENV = "TOKENMILL_QUANT_GEMV_CONFIGS"


def config_from_json(entry: dict[str, Any]) -> Choice:
    """One table entry: {"kernel": "splitk" | "wna16_gemm" | "scaled_mm", plus the config's fields}."""
    fields = {k: v for k, v in entry.items() if k != "kernel"}
    if entry["kernel"] == "splitk":
        return SplitKConfig(**fields)
    if entry["kernel"] == "wna16_gemm":
        return WNA16Config(**fields)
    if entry["kernel"] == "scaled_mm":
        return None
    raise ValueError(f"quantized GEMV config table: unknown kernel {entry['kernel']!r}")


@functools.cache
def _load_table(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


@functools.cache
def _cuda_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def tuned_choice(device: torch.device, fmt: str, n: int, k: int, rows: int) -> tuple[bool, Choice]:
    """(found, choice) from the measured table: the entry for the smallest measured row count >= rows."""
    path = os.environ.get(CONFIGS_ENV) or str(SHIPPED_CONFIGS)
    if not os.path.exists(path):
        return False, None
    shapes = _load_table(path).get(_device_name(device), {}).get(fmt, {}).get(f"{n}x{k}")
    if not shapes:
        return False, None
    measured = sorted(int(r) for r in shapes)
    bucket = next((r for r in measured if r >= rows), None)
    if bucket is None:
        return False, None
    return True, config_from_json(shapes[str(bucket)])


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter on CPU: size splits as for an H100
        return 132
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _split_to_fill(tiles: int, steps: int, num_sms: int, min_steps: int = 2) -> int:
    """Powers of two until tiles x splits covers the SMs twice, keeping ``min_steps`` K steps per split."""
    split = 1
    while tiles * split < 2 * num_sms and steps // (split * 2) >= min_steps:
        split *= 2
    return split


def default_wna16_config(rows: int, n: int, k: int, bits: int, group_size: int,
                         sms: int = 132) -> SplitKConfig | WNA16Config:
    """Streaming up to 16 rows; above, the tiled kernel's best tiles on the H100 (gpu_quant_gemv_sweep run 1:
    128-row MMA tiles, 8 warps, 2-way split to 128 rows) -- still slower than bf16 cuBLAS there."""
    per_word = 32 // bits
    if rows > 16:
        return WNA16Config(128, 64, 64, 2 if rows <= 128 else 1, 8, 3)
    if rows <= WNA16_FMA_MAX_ROWS:
        block_m, block_n, block_k, kind = next_power_of_2(rows), 128, 128, "rows"
    else:
        block_m, block_n, block_k, kind = 16, 64, 16 * per_word, "dot"
    tiles = -(-rows // max(block_m, 16 if kind != "rows" else 1)) * -(-n // block_n)
    split = _split_to_fill(tiles, k // block_k, sms)
    return SplitKConfig(block_m, block_n, block_k, split, 4, 2 if kind == "rows" else 3, kind)


def default_fp8_config(rows: int, n: int, k: int, sms: int = 132) -> SplitKConfig | None:
    """None above FP8_GEMV_MAX_ROWS: ``torch._scaled_mm``."""
    if rows > FP8_GEMV_MAX_ROWS:
        return None
    if rows <= 4:
        block_m, block_n, block_k, kind = next_power_of_2(rows), 16, 256 if rows <= 2 else 128, "rows"
    else:
        block_m, block_n, block_k, kind = 16, 64, 128, "dot"
    tiles = -(-rows // max(block_m, 16 if kind != "rows" else 1)) * -(-n // block_n)
    split = _split_to_fill(tiles, -(-k // block_k), sms)
    return SplitKConfig(block_m, block_n, block_k, split, 4, 2 if kind == "rows" else 3, kind)


def wna16_format(packed: PackedWeight) -> str:
    return f"w{packed.bits}a16_g{packed.group_size}"


def wna16_cuda_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """x [M, K] on CUDA through the planned, measured or default kernel for M rows."""
    rows = x.shape[0]
    n, k = packed.out_features, packed.in_features
    config = plan.get(next_power_of_2(max(rows, 1))) if plan else None
    if config is None:
        found, config = tuned_choice(x.device, wna16_format(packed), n, k, rows)
        if not found or config is None:
            config = default_wna16_config(rows, n, k, packed.bits, packed.group_size, num_sms(x.device))
    if isinstance(config, WNA16Config):
        return wna16_linear(x, packed, bias, config)
    return wna16_splitk_linear(x, packed, bias, config)


def fp8_gemv_config(x: torch.Tensor, n: int, plan: Plan) -> SplitKConfig | None:
    """The FP8 GEMV config for x's rows, or None where ``torch._scaled_mm`` serves them."""
    rows = x.shape[0]
    key = next_power_of_2(max(rows, 1))
    if plan and key in plan:
        return plan[key]
    found, config = tuned_choice(x.device, "fp8", n, x.shape[1], rows)
    if found:
        return config if isinstance(config, SplitKConfig) else None
    return default_fp8_config(rows, n, x.shape[1], num_sms(x.device))

