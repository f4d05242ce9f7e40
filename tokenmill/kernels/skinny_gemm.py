"""Skinny GEMM for decode: y = x W^T (+ b) when x has only a few rows (M <= 16).

A decode step reads every weight once for a handful of tokens, so these products are bound by the weight
read. cuBLAS picks its kernels by heuristics; for some shapes (Llama-3-8B's o_proj at M=1 measured 1.6 TB/s
of the 3.0 TB/s copy rate) a plain tiled kernel streams the weight faster. The runner times both per
weight shape at start-up and keeps the faster (runner/linear_tuning.py); this module only computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON, require_triton, tl, triton

MAX_ROWS = 16  # rows are padded to one 16-row MMA tile; more rows than that belong to cuBLAS


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int = 32  # output columns per program
    block_k: int = 256  # reduction chunk per iteration
    num_warps: int = 4
    num_stages: int = 4


CANDIDATES = (
    SkinnyConfig(16, 256, 4, 4),
    SkinnyConfig(32, 256, 4, 4),
    SkinnyConfig(32, 128, 4, 6),
    SkinnyConfig(64, 128, 4, 4),
)


def skinny_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 product cast back to x's dtype."""
    out = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["M"])  # rows follow the batch size: one compiled kernel for all
    def _skinny_gemm_kernel(
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
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        nmask = n < N
        mmask = m < M
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + m[:, None] * stride_om + n[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=mmask[:, None] & nmask[None, :],
        )


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: SkinnyConfig = SkinnyConfig()
) -> torch.Tensor:
    """x [M, K] (M <= 16, bf16/fp16) times weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype."""
    require_triton("skinny_linear")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_linear needs x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows; got {x.shape[0]}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        raise ValueError(f"skinny_linear takes bf16/fp16 x and weight of one dtype; got {x.dtype}, {weight.dtype}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("skinny_linear needs contiguous rows (last stride 1)")
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _skinny_gemm_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
