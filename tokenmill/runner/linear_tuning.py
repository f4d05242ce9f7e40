"""Start-up choice between cuBLAS and our Triton kernels (GEMV, tiled GEMM) per weight shape and row count.

Timed on the device itself (weights are read from HBM each call, as in a decode step: triton's do_bench
flushes L2 between runs); a Triton config is kept for a (shape, rows) pair only when it is faster than
cuBLAS by ``margin``. Measured on the H100 (benchmarks/gpu_profile.py --linear-only,
gpu_linear_gemv_2026-11-24.json): at one row the GEMV beats cuBLAS by 4-13% on Llama-3-8B's projections; the
tiled GEMM wins on lm_head up to 32 rows; from 32 rows up cuBLAS wins everywhere else. Hence a per-shape,
per-row-count choice, not a rule.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2
from tokenmill.kernels.decode_linear import KernelConfig, candidates_for, decode_linear
from tokenmill.model.layers import Linear

logger = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Plan = dict[int, KernelConfig]


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=10))


def tune_linears(model: torch.nn.Module, max_rows: int = ROW_COUNTS[-1], margin: float = 0.97) -> dict[tuple[int, int, bool], Plan]:
    """Set ``gemm_plan`` on every bf16/fp16 CUDA ``Linear`` of ``model`` for row counts up to ``max_rows``
    (rounded up to a power of two); returns the plan per (out, in, has_bias) weight shape."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not HAS_TRITON or not linears:
        return {}
    row_counts = [r for r in ROW_COUNTS if r <= next_power_of_2(max(1, max_rows))]
    plans: dict[tuple[int, int, bool], Plan] = {}
    for module in linears:
        weight = module.weight
        if not weight.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
            continue
        key = (weight.shape[0], weight.shape[1], module.bias is not None)
        if key not in plans:
            plans[key] = _tune_shape(weight, module.bias, row_counts, margin)
        module.gemm_plan = plans[key]
    for (n, k, _), plan in plans.items():
        chosen = ", ".join(f"{rows}: {config.name}" for rows, config in sorted(plan.items())) or "none"
        logger.info("linear %dx%d: Triton kernel at rows {%s}, cuBLAS otherwise", n, k, chosen)
    return plans


@torch.inference_mode()
def _tune_shape(weight: torch.Tensor, bias: torch.Tensor | None, row_counts: list[int], margin: float) -> Plan:
    plan: Plan = {}
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        cublas = _time_ms(lambda x=x: F.linear(x, weight, bias))
        candidates = candidates_for(rows)
        timed = [(_time_ms(lambda x=x, c=c: decode_linear(x, weight, bias, c)), i) for i, c in enumerate(candidates)]
        best_ms, best = min(timed)
        if best_ms < margin * cublas:
            plan[rows] = candidates[best]
    return plan
