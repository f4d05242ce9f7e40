"""Weight-streaming GEMV for one or two rows (batch-1/2 decode): y = x W^T (+ b).

At one row a decode step's projections are pure weight reads. Each program here reduces ``block_n`` weight
rows against the (at most two) input rows with fp32 FMAs over [block_n, block_k] weight tiles: no 16-row
tensor-core tile to pad to, small programs in many waves. Measured on the H100 (benchmarks/results/
gpu_linear_gemv_2026-11-24.json, L2 flushed between calls like a decode step): at one row 4-13% faster than
cuBLAS on every Llama-3-8B projection (gate_up 96.4 -> 87.8 us, o 23.2 -> 20.2, lm_head 379 -> 342), and
in the batch-1 decode graph 1.06x the step of the tiled-GEMM choice (gpu_decode_linears_2026-11-24.json);
slower from four rows on. The runner keeps it per shape and row count only where it wins
(runner/linear_tuning.py). A variant that applied SiLU-and-mul while loading the down projection's input
saved the activation kernel but was no faster inside the decode CUDA graph (same JSON), so it was dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, pdl_launch, pdl_wait, tl, triton
from tokenmill.kernels.tiled_gemm import linear_output

if HAS_TRITON:
    from tokenmill.kernels.tiled_gemm import store_linear_tile

GEMV_MAX_ROWS = 2  # from four rows on the [rows, block_n, block_k] products cost more than an MMA tile


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows (outputs) per program
    block_k: int  # reduction chunk per iteration
    num_warps: int = 4
    num_stages: int = 2

    @property
    def name(self) -> str:
        return f"gemv_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"


GEMV_CANDIDATES = (
    GemvConfig(4, 1024, 4, 2),
    GemvConfig(4, 1024, 4, 3),
    GemvConfig(8, 1024, 4, 3),
    GemvConfig(2, 2048, 4, 2),
    GemvConfig(2, 2048, 8, 2),
    GemvConfig(2, 4096, 8, 2),
)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        nmask = n < N
        mmask = m < M
        w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_wn + kk[None, :]
        x_ptrs = x_ptr + m[:, None] * stride_xm + kk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                wmask = nmask[:, None]
                xmask = mmask[:, None]
            else:
                kmask = (k0 + kk) < K
                wmask = nmask[:, None] & kmask[None, :]
                xmask = mmask[:, None] & kmask[None, :]
            w = tl.load(w_ptrs, mask=wmask, other=0.0)
            x = tl.load(x_ptrs, mask=xmask, other=0.0)
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        store_linear_tile(acc, b_ptr, out_ptr, m, n, mmask, nmask, stride_om, HAS_BIAS)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = GEMV_CANDIDATES[0],
) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_ROWS, bf16/fp16) times weight [N, K]^T (+ bias) -> [M, N], fp32 accumulation."""
    out = linear_output(x, weight, "gemv")
    if x.shape[0] > GEMV_MAX_ROWS:
        raise ValueError(f"gemv takes at most {GEMV_MAX_ROWS} rows; got {x.shape[0]} (use tiled_linear)")
    m = x.shape[0]
    n, k = weight.shape
    if m == 0:
        return out
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        BLOCK_M=next_power_of_2(m), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        **pdl_launch(x.device, m),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
