"""Tiled Triton GEMM for decode-sized products: y = x W^T (+ b) with x [M, K], M up to a few hundred rows.

Two regimes, one kernel with the row tile as a parameter:
- skinny (M <= 16): a decode step reads every weight once for a handful of tokens, so the product is bound
  by the weight read; rows pad to one 16-row MMA tile. cuBLAS's heuristics left Llama-3-8B's o_proj at M=1
  at 1.6 TB/s of the 3.0 TB/s copy rate, where a plain tiled kernel streams the weight faster.
- wide (17..256 rows, the decode CUDA-graph ladder): 32-128-row tiles; programs that share a weight tile
  run side by side so the weight is read from HBM once. Measured on the H100 (gpu_linear_tiled_2026-11-24):
  20-40% slower than cuBLAS on every Llama-3-8B / Qwen3-0.6B projection but lm_head (3-4% faster up to 32
  rows), since at these row counts cuBLAS's wgmma/TMA kernels win on compute.
The runner times cuBLAS against these configs per weight shape and row count at start-up and keeps a config
only where it wins (runner/linear_tuning.py); this module only computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON, pdl_launch, pdl_wait, require_triton, tl, triton

SKINNY_ROWS = 16  # up to this many rows one 16-row tile covers the batch


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows per program
    block_n: int  # output columns per program
    block_k: int  # reduction chunk per iteration
    num_warps: int = 4
    num_stages: int = 4

    @property
    def name(self) -> str:
        return f"m{self.block_m}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"


SKINNY_CANDIDATES = (
    TileConfig(16, 16, 256, 4, 4),
    TileConfig(16, 32, 256, 4, 4),
    TileConfig(16, 32, 128, 4, 6),
    TileConfig(16, 64, 128, 4, 4),
)
# Shared memory per stage stays <= 40 KB so 3-4 stages fit the H100's 228 KB.
WIDE_CANDIDATES = (
    TileConfig(32, 64, 128, 4, 4),
    TileConfig(64, 64, 128, 4, 4),
    TileConfig(64, 128, 64, 4, 4),
    TileConfig(128, 128, 64, 8, 3),
)


def candidates_for(rows: int) -> tuple[TileConfig, ...]:
    return SKINNY_CANDIDATES if rows <= SKINNY_ROWS else WIDE_CANDIDATES


def tiled_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 product cast back to x's dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def store_linear_tile(acc, b_ptr, out_ptr, m, n, mmask, nmask, stride_om, HAS_BIAS: tl.constexpr):
        """The Triton linears' epilogue: fp32 [rows m, outputs n] tile (+ bias) stored in the output dtype."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + m[:, None] * stride_om + n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mmask[:, None] & nmask[None, :],
        )

    @triton.jit(do_not_specialize=["M"])  # rows follow the batch size: one compiled kernel for all
    def _tiled_gemm_kernel(
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
        # Row tiles vary fastest: the programs that read one weight tile are launched together, so the
        # weight comes from HBM once and from L2 for the others.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        mmask = m < M
        nmask = n < N
        x_ptrs = x_ptr + m[:, None] * stride_xm + kk[None, :]
        w_ptrs = w_ptr + n.to(tl.int64)[:, None] * stride_wn + kk[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mmask[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None], other=0.0)
            else:
                kmask = (k0 + kk) < K
                x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        store_linear_tile(acc, b_ptr, out_ptr, m, n, mmask, nmask, stride_om, HAS_BIAS)


def linear_output(x: torch.Tensor, weight: torch.Tensor, what: str) -> torch.Tensor:
    """Check the operands of a Triton linear (x [M, K] and weight [N, K], bf16/fp16, contiguous rows) and
    return its empty [M, N] output."""
    require_triton(what)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{what} needs x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"{what} takes bf16/fp16 x and weight of one dtype; got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"{what} needs contiguous rows (last stride 1)")
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def tiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: TileConfig = SKINNY_CANDIDATES[1]
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, fp32 accumulation."""
    out = linear_output(x, weight, "tiled_linear")
    m, k = x.shape
    n = weight.shape[0]
    if m == 0:
        return out
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _tiled_gemm_kernel[grid](
        x, weight, bias if bias is not None else weight, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        **pdl_launch(x.device, m),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
