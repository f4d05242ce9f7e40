"""Start-up choice between cuBLAS and the tiled Triton GEMM for each weight shape at decode row counts.

Timed on the device itself (weights are read from HBM each call, as in a decode step: triton's do_bench
flushes L2 between runs); a tiled config is kept for a (shape, rows) pair only when it is faster than cuBLAS
by ``margin``. Measured on the H100 (benchmarks/gpu_profile.py): at one row Llama-3-8B's lm_head 381 → 354 µs
and o_proj 23.2 → 21.8 µs, while cuBLAS stays ahead on gate_up; from 32 rows up cuBLAS wins everywhere but on
lm_head. Hence a per-shape, per-row-count choice, not a rule.

A SwiGLU down projection (``Linear.gated_input``) is also timed as one fused kernel (SiLU-and-mul applied
while the tiled GEMM loads the gate|up output) against the activation kernel followed by its own plan.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2
from tokenmill.kernels.activation import silu_and_mul_triton
from tokenmill.kernels.tiled_gemm import TileConfig, candidates_for, tiled_linear
from tokenmill.model.layers import Linear

logger = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Plan = dict[int, TileConfig]


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=10))


def tune_linears(model: torch.nn.Module, max_rows: int = ROW_COUNTS[-1], margin: float = 0.97) -> dict[tuple[int, int, bool], Plan]:
    """Set ``gemm_plan`` (and ``gated_plan`` where ``gated_input``) on every bf16/fp16 CUDA ``Linear`` of
    ``model`` for row counts up to ``max_rows`` (rounded up to a power of two); returns the plain plan per
    (out, in, has_bias) weight shape."""
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    if not HAS_TRITON or not linears:
        return {}
    row_counts = [r for r in ROW_COUNTS if r <= next_power_of_2(max(1, max_rows))]
    plans: dict[tuple[int, int, bool], Plan] = {}
    gated_plans: dict[tuple[int, int, bool], Plan] = {}
    for module in linears:
        weight = module.weight
        if not weight.is_cuda or weight.dtype not in (torch.bfloat16, torch.float16):
            continue
        key = (weight.shape[0], weight.shape[1], module.bias is not None)
        if key not in plans:
            plans[key] = _tune_shape(weight, module.bias, row_counts, margin)
        module.gemm_plan = plans[key]
        if module.gated_input:
            if key not in gated_plans:
                gated_plans[key] = _tune_gated(module, row_counts, margin)
            module.gated_plan = gated_plans[key]
    for what, table in (("linear", plans), ("SiLU-and-mul + linear", gated_plans)):
        for (n, k, _), plan in table.items():
            chosen = ", ".join(f"{rows}: {config.name}" for rows, config in sorted(plan.items())) or "none"
            logger.info("%s %dx%d: tiled GEMM at rows {%s}, cuBLAS (and the activation kernel) otherwise", what, n, k, chosen)
    return plans


@torch.inference_mode()
def _tune_shape(weight: torch.Tensor, bias: torch.Tensor | None, row_counts: list[int], margin: float) -> Plan:
    plan: Plan = {}
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        cublas = _time_ms(lambda x=x: F.linear(x, weight, bias))
        candidates = candidates_for(rows)
        timed = [(_time_ms(lambda x=x, c=c: tiled_linear(x, weight, bias, c)), i) for i, c in enumerate(candidates)]
        best_ms, best = min(timed)
        if best_ms < margin * cublas:
            plan[rows] = candidates[best]
    return plan


@torch.inference_mode()
def _tune_gated(module: Linear, row_counts: list[int], margin: float) -> Plan:
    """Fused SiLU-and-mul GEMM vs the activation kernel followed by the module's own (already tuned) plan."""
    weight, bias = module.weight, module.bias
    module.gated_plan = {}
    plan: Plan = {}
    for rows in row_counts:
        gate_up = torch.randn(rows, 2 * weight.shape[1], device=weight.device, dtype=weight.dtype)
        separate = _time_ms(lambda g=gate_up: module(silu_and_mul_triton(g)))
        candidates = candidates_for(rows)
        timed = [(_time_ms(lambda g=gate_up, c=c: tiled_linear(g, weight, bias, c, gated=True)), i)
                 for i, c in enumerate(candidates)]
        best_ms, best = min(timed)
        if best_ms < margin * separate:
            plan[rows] = candidates[best]
    return plan
