"""Start-up choice between cuBLAS and our Triton kernels (GEMV, tiled GEMM) per weight shape and row count.

Timed on the device itself (weights are read from HBM each call, as in a decode step: triton's do_bench
flushes L2 between runs); a Triton config is kept for a (shape, rows) pair only when it is faster than
cuBLAS by ``margin``. Measured on the H100 (benchmarks/gpu_profile.py --linear-only,
gpu_linear_gemv_2026-11-24.json): at one row the GEMV beats cuBLAS by 4-13% on Llama-3-8B's projections; the
tiled GEMM wins on lm_head up to 32 rows; from 32 rows up cuBLAS wins everywhere else. Hence a per-shape,
per-row-count choice, not a rule.

Each candidate is timed the way a decode graph runs it: replayed in a CUDA graph, cycling through copies of the
weight so that every call reads it from HBM. Timing with triton's ``do_bench`` (an L2 flush before each call)
picked our tiled GEMM for Llama-3-8B's qkv at 256 rows, which in the decode graph is 39 µs against cuBLAS's 24
(benchmarks/results/gpu_step_anatomy_2026-11-24.json): the flush leaves L2 full of dirty lines that the timed
call must write back first, which is not what a decode step sees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tokenmill.config import EngineConfig
from tokenmill.cuda_timing import median_event_ms
from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2
from tokenmill.kernels.decode_linear import KernelConfig, candidates_for, decode_linear
from tokenmill.model.linear import matmul_layers

logger = logging.getLogger(__name__)

ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

Plan = dict[int, KernelConfig]


# Weight bytes each timing cycles through: several times the H100's 50 MB L2, so no call finds its weight there.
ROTATION_BYTES = 256 << 20
MAX_COPIES = 32
CALLS_PER_GRAPH = 24

Operands = tuple[torch.Tensor, torch.Tensor | None]


def weight_rotation(weight: torch.Tensor, bias: torch.Tensor | None) -> list[Operands]:
    """The weight (and bias) plus copies of it, ``ROTATION_BYTES`` in all (at most ``MAX_COPIES`` tensors)."""
    copies = max(1, min(MAX_COPIES, -(-ROTATION_BYTES // weight.nbytes)))
    return [(weight, bias)] + [(weight.clone(), None if bias is None else bias.clone()) for _ in range(copies - 1)]


def graph_time_ms(fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], rotation: list[Operands],
              repeats: int = 5) -> float:
    """Median time of one ``fn(weight, bias)`` call inside a CUDA graph of calls over ``rotation``."""
    calls = rotation * -(-CALLS_PER_GRAPH // len(rotation))
    for weight, bias in rotation:  # compile and pick cuBLAS's algorithm outside the capture
        fn(weight, bias)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weight, bias in calls:
            fn(weight, bias)
    graph.replay()
    return median_event_ms(graph.replay, repeats) / len(calls)


def tune_linears(model: torch.nn.Module, max_rows: int = ROW_COUNTS[-1], margin: float = 0.97) -> dict[tuple[int, int, bool], Plan]:
    """Set ``gemm_plan`` on every layer whose LinearMethod has a dense bf16/fp16 CUDA weight to tune (this
    tensor-parallel rank's partition: the shapes its matmuls really have), for row counts up to ``max_rows``
    (rounded up to a power of two); returns the plan per (out, in, has_bias) weight shape."""
    tunable = []
    for _, module in matmul_layers(model):
        weight = module.linear_method.tunable_weight(module)
        if weight is not None and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
            tunable.append((module, weight, module.matmul_bias()))
    if not HAS_TRITON or not tunable:
        return {}
    row_counts = [r for r in ROW_COUNTS if r <= next_power_of_2(max(1, max_rows))]
    plans: dict[tuple[int, int, bool], Plan] = {}
    for module, weight, bias in tunable:
        key = (weight.shape[0], weight.shape[1], bias is not None)
        if key not in plans:
            plans[key] = _tune_shape(weight, bias, row_counts, margin)
        module.gemm_plan = plans[key]
    for (n, k, _), plan in plans.items():
        chosen = ", ".join(f"{rows}: {config.name}" for rows, config in sorted(plan.items())) or "none"
        logger.info("linear %dx%d: Triton kernel at rows {%s}, cuBLAS otherwise", n, k, chosen)
    return plans


def tune_rank_linears(model: torch.nn.Module, config: EngineConfig, device: str) -> None:
    """A tensor-parallel rank tunes its own partition's shapes (on CUDA with tune_gemm on), before graph capture,
    which bakes the choice in; rows up to the largest decode batch."""
    if device.startswith("cuda") and config.runner.tune_gemm:
        tune_linears(model, max_rows=config.scheduler.max_num_seqs)


@torch.inference_mode()
def _tune_shape(weight: torch.Tensor, bias: torch.Tensor | None, row_counts: list[int], margin: float) -> Plan:
    plan: Plan = {}
    rotation = weight_rotation(weight, bias)
    for rows in row_counts:
        x = torch.randn(rows, weight.shape[1], device=weight.device, dtype=weight.dtype)
        cublas = graph_time_ms(lambda w, b, x=x: F.linear(x, w, b), rotation)
        candidates = candidates_for(rows)
        timed = [(graph_time_ms(lambda w, b, x=x, c=c: decode_linear(x, w, b, c), rotation), i)
                 for i, c in enumerate(candidates)]
        best_ms, best = min(timed)
        if best_ms < margin * cublas:
            plan[rows] = candidates[best]
    return plan
