"""Which kernel a quantized linear runs on CUDA, per row count: the split-K streaming kernels
(kernels/wna16_splitk.py, fp8_gemv.py), the tiled wna16 kernel, or (FP8) ``torch._scaled_mm``.

A layer's ``gemm_plan`` (rows rounded up to a power of two -> config), filled by the start-up tuner
(runner/linear_tuning.py) where it ran, wins; otherwise the defaults below, picked from
benchmarks/gpu_quant_gemv_sweep.py on the H100 (Llama-3-8B projections): FMA streaming for 1-4 rows, tensor-core
streaming above, split over K until the output tiles times the splits fill the GPU twice.
"""

from __future__ import annotations

import functools

import torch

from tokenmill.kernels._triton import next_power_of_2
from tokenmill.kernels.splitk import SplitKConfig
from tokenmill.kernels.wna16_gemm import PackedWeight, WNA16Config, wna16_linear
from tokenmill.kernels.wna16_splitk import wna16_splitk_linear

FP8_GEMV_MAX_ROWS = 16  # above: torch._scaled_mm (tensor-core FP8) is faster
WNA16_FMA_MAX_ROWS = 4  # above: tensor-core products (rows pad to 16)

Plan = dict[int, SplitKConfig | WNA16Config | None]  # None: the format's library path (FP8: _scaled_mm)


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


def default_wna16_config(rows: int, n: int, k: int, bits: int, group_size: int, sms: int = 132) -> SplitKConfig:
    per_word = 32 // bits
    if rows <= WNA16_FMA_MAX_ROWS:
        block_m, block_n, block_k, dot = next_power_of_2(rows), 64, min(128, group_size), False
    elif rows <= 64:
        block_m, block_n, block_k, dot = min(64, next_power_of_2(rows)), 64 if rows <= 16 else 128, 16 * per_word, True
    else:
        block_m, block_n, block_k, dot = 128, 128, 16 * per_word, True
    tiles = -(-rows // max(block_m, 16 if dot else 1)) * -(-n // block_n)
    split = _split_to_fill(tiles, k // block_k, sms)
    warps = 8 if block_m >= 64 else 4
    return SplitKConfig(block_m, block_n, block_k, split, warps, 3 if dot else 2, dot)


def default_fp8_config(rows: int, n: int, k: int, sms: int = 132) -> SplitKConfig | None:
    """None above FP8_GEMV_MAX_ROWS: ``torch._scaled_mm``."""
    if rows > FP8_GEMV_MAX_ROWS:
        return None
    if rows <= 4:
        block_m, block_n, block_k, dot = next_power_of_2(rows), 16, 256 if rows <= 2 else 128, False
    else:
        block_m, block_n, block_k, dot = 16, 64, 128, True
    tiles = -(-rows // max(block_m, 16 if dot else 1)) * -(-n // block_n)
    split = _split_to_fill(tiles, -(-k // block_k), sms)
    return SplitKConfig(block_m, block_n, block_k, split, 4, 3 if dot else 2, dot)


def wna16_cuda_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """x [M, K] on CUDA through the planned (or default) kernel for M rows."""
    rows = x.shape[0]
    config = plan.get(next_power_of_2(max(rows, 1))) if plan else None
    if config is None:
        config = default_wna16_config(rows, packed.out_features, packed.in_features, packed.bits, packed.group_size,
                                      num_sms(x.device))
    if isinstance(config, WNA16Config):
        return wna16_linear(x, packed, bias, config)
    return wna16_splitk_linear(x, packed, bias, config)


def fp8_gemv_config(x: torch.Tensor, n: int, plan: Plan) -> SplitKConfig | None:
    """The FP8 GEMV config for x's rows, or None where ``torch._scaled_mm`` serves them."""
    rows = x.shape[0]
    key = next_power_of_2(max(rows, 1))
    if plan and key in plan:
        return plan[key]
    return default_fp8_config(rows, n, x.shape[1], num_sms(x.device))

