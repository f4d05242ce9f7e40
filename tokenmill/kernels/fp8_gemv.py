"""FP8-weight GEMV for decode batches: bf16/fp16 activations times e4m3 weights [N, K] with one fp32 scale per
output channel (quantization/fp8.py's layout), weights upcast in registers, fp32 accumulation.

At a few rows ``torch._scaled_mm`` is no faster than bf16 (benchmarks/results/gpu_fp8_h100_2026-12-06.json: it
must also quantize the activations, and cuBLASLt's FP8 kernels are tiled for large products), though the weight
bytes are halved. Here each program streams [BLOCK_N, BLOCK_K] weight tiles (contiguous along K) for its share
of K, split-K reduced in the same launch (kernels/splitk.py); activations are not quantized, so the result is the
exact product of x with the dequantized weight up to fp32 rounding.

- ``rows`` / ``fma`` kinds (1-8 rows): fp32 FMAs, partial sums per (row, column, k lane), reduced once at the end.
- ``dot`` kinds: the tensor cores with the operands swapped (out^T = W x^T), so the upcast weight tile is the
  product's left operand straight from registers and x's rows pad to 16 columns only.
"""

from __future__ import annotations

import torch

from tokenmill.kernels._triton import HAS_TRITON, require_triton, tl, triton
from tokenmill.kernels.splitk import KINDS, SplitKConfig, dot_in_fp32, fit_split_k, splitk_workspace

if HAS_TRITON:
    from tokenmill.kernels.splitk import splitk_finish, stack_rows

    @triton.jit
    def _row_times(x_ptr, row, M, stride_xm, k, kmask, wf):
        """Row ``row`` of x (zeros past M) times the upcast tile wf [N, K], elementwise."""
        x = tl.load(x_ptr + row * stride_xm + k, mask=kmask & ((row + 0 * k) < M), other=0.0)
        return x.to(tl.float32)[None, :] * wf

    @triton.jit(do_not_specialize=["M"])
    def _fp8_gemv_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_om,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, KIND: tl.constexpr, DOT_F32: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        """KIND 0 rows, 1 fma, 2 dot (see SplitKConfig)."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        pid_n = pid // num_m
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = m < M
        nmask = n < N
        kk = tl.arange(0, BLOCK_K)
        per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, tl.cdiv(K, BLOCK_K))
        row0 = pid_m * BLOCK_M
        if KIND == 0:  # one [N, K] accumulator per row, in the weight tile's layout
            acc0 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            acc1 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            acc3 = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        elif KIND == 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        if PREFETCH:  # next step's tile is loaded before this step's is used: two tiles in flight
            k = first * BLOCK_K + kk
            ahead = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :],
                            mask=nmask[:, None] & ((k < K) & ((first + 0 * kk) < last))[None, :], other=0.0)
        for step in range(first, last):
            k = step * BLOCK_K + kk
            kmask = k < K
            if PREFETCH:
                w = ahead
                k_ahead = k + BLOCK_K
                ahead = tl.load(w_ptr + n[:, None] * stride_wn + k_ahead[None, :],
                                mask=nmask[:, None] & ((k_ahead < K) & ((step + 1 + 0 * kk) < last))[None, :],
                                other=0.0)
            else:
                w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=nmask[:, None] & kmask[None, :],
                            other=0.0)
            if KIND == 0:
                wf = w.to(tl.float32)
                acc0 += _row_times(x_ptr, row0, M, stride_xm, k, kmask, wf)
                if BLOCK_M > 1:
                    acc1 += _row_times(x_ptr, row0 + 1, M, stride_xm, k, kmask, wf)
                if BLOCK_M > 2:
                    acc2 += _row_times(x_ptr, row0 + 2, M, stride_xm, k, kmask, wf)
                    acc3 += _row_times(x_ptr, row0 + 3, M, stride_xm, k, kmask, wf)
            else:
                x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :],
                            other=0.0)
                if KIND == 1:
                    acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
                elif DOT_F32:
                    acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
                else:  # e4m3 values are exact in bf16 and fp16
                    acc = tl.dot(w.to(x.dtype), tl.trans(x), acc)
        if KIND == 0:
            result = stack_rows(acc0, acc1, acc2, acc3, 1, BLOCK_M)
        elif KIND == 1:
            result = tl.sum(acc, axis=2)
        else:
            result = tl.trans(acc)
        result = result * tl.load(ws_ptr + n, mask=nmask, other=0.0)[None, :]
        splitk_finish(result, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, pid, pid_k, HAS_BIAS,
                      SPLIT_K)


def fp8_gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
    config: SplitKConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times (weight [N, K] e4m3 * weight_scale [N])^T (+ bias) -> [M, N] in x's dtype."""
    require_triton("fp8_gemv")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp8_gemv needs x [M, K] and weight [N, K]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_gemv takes bf16/fp16 activations; got {x.dtype}")
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(f"fp8_gemv needs one weight scale per output channel ({weight.shape[0]}); got "
                         f"{weight_scale.numel()}")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    if config is None:
        from tokenmill.kernels.quant_dispatch import FP8_GEMV_MAX_ROWS, default_fp8_config

        config = default_fp8_config(min(m, FP8_GEMV_MAX_ROWS), n, k)
    block_m = max(16, config.block_m) if config.dot else config.block_m
    out = x.new_empty((m, n))
    if m == 0:
        return out
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, config.block_n)
    split_k = fit_split_k(config.split_k, m, n, tiles, triton.cdiv(k, config.block_k))
    work = splitk_workspace(x.device)
    scale = weight_scale.reshape(-1).float()
    _fp8_gemv_kernel[(tiles, split_k)](
        x, weight, scale, bias if bias is not None else scale, out, work.partials, work.counters,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, KIND=min(KINDS.index(config.kind), 2), DOT_F32=dot_in_fp32(x.dtype),
        PREFETCH=config.prefetch,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
