"""Start-up choice between cuBLAS and the skinny GEMM for each weight shape at decode row counts.

Timed on the device itself (weights are read from HBM each call, as in a decode step: triton's do_bench
flushes L2 between runs); the skinny kernel is kept for a (shape, rows) pair only when it is faster by
``margin``. Measured on the H100 (benchmarks/gpu_profile.py): Llama-3-8B lm_head 375 → 341 µs and o_proj
11.3 → 8.7 µs at one row, while cuBLAS stays ahead on gate_up — hence a per-shape choice, not a rule.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.skinny_gemm import CANDIDATES, SkinnyConfig, skinny_linear
from tokenmill.model.layers import Linear

logger = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16)


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=10))


def tune_skinny_linears(model: torch.nn.Module, margin: float = 0.97) -> dict[tuple[int, int, bool], dict[int, SkinnyConfig]]:
    """Set ``skinny_plan`` on every bf16/fp16 CUDA ``Linear`` of ``model``; returns the plan per weight shape."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not HAS_TRITON or not linears:
        return {}
    plans: dict[tuple[int, int, bool], dict[int, SkinnyConfig]] = {}
    for module in linears:
        weight = module.weight
        if not weight.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
            continue
        key = (weight.shape[0], weight.shape[1], module.bias is not None)
        if key not in plans:
            plans[key] = _tune_shape(weight, module.bias, margin)
        module.skinny_plan = plans[key]
    for (n, k, _), plan in plans.items():
        logger.info("linear %dx%d: skinny GEMM for rows %s, cuBLAS otherwise", n, k, sorted(plan) or "none")
    return plans


@torch.inference_mode()
def _tune_shape(weight: torch.Tensor, bias: torch.Tensor | None, margin: float) -> dict[int, SkinnyConfig]:
    plan: dict[int, SkinnyConfig] = {}
    for rows in ROW_COUNTS:
        x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        cublas = _time_ms(lambda x=x: F.linear(x, weight, bias))
        timed = [(_time_ms(lambda x=x, c=c: skinny_linear(x, weight, bias, c)), i) for i, c in enumerate(CANDIDATES)]
        best_ms, best = min(timed)
        if best_ms < margin * cublas:
            plan[rows] = CANDIDATES[best]
    return plan
