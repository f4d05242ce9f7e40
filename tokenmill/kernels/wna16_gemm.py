"""Weight-only quantized linears (W4A16 / W8A16): y = x Wq^T (+ b) with Wq kept as packed 4- or 8-bit codes.

One packed layout, the GPTQ one that both GPTQ and AWQ checkpoints are repacked into at load:
``qweight`` int32 [K / (32 / bits), N] (input channel k in word k // per_word at bits (k % per_word) * bits),
``scales`` [K / group_size, N] and optional float ``zeros`` [K / group_size, N] (absent: symmetric, zero
2^(bits-1)), so W[k, n] = (code - zero) * scale with k's group = k // group_size. Act-order checkpoints are
permuted at load so groups are contiguous; the caller permutes x's columns the same way.

- ``wna16_linear_reference``: dequantize to fp32 and multiply (the tests' reference).
- ``wna16_linear_cpu``: dequantize a slab of output columns at a time and multiply in x's dtype, so the dense
  copy never exceeds ``CPU_SLAB_ELEMENTS`` (the serving path on CPUs).
- ``wna16_linear``: Triton kernel: codes unpacked and scaled in registers, fp32 accumulation through tl.dot
  (16-row MMA tiles; decode batches pad to one tile), split over K when too few output tiles fill the GPU; or,
  with ``WNA16Config(gemv=True)`` and at most 8 rows, a GEMV that loads each packed word once and reduces
  row x tile products without MMA padding (benchmarks/gpu_quantized.py times both per shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, require_triton, tl, triton
from tokenmill.kernels.splitk import dot_in_fp32

CPU_SLAB_ELEMENTS = 1 << 22  # dequantized weight elements alive at once on the CPU path (16 MB in fp32)


@dataclass(frozen=True)
class PackedWeight:
    """A quantized linear's tensors in the kernel layout (see the module docstring)."""

    qweight: torch.Tensor  # int32 [K / per_word, N]
    scales: torch.Tensor  # [groups, N], activation dtype
    zeros: torch.Tensor | None  # [groups, N] float zero points, or None (symmetric)
    bits: int
    group_size: int  # input channels per group (K for one group)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * (32 // self.bits)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [K / per_word, N] -> codes int32 [K, N]."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & (2**bits - 1)
    return codes.reshape(-1, qweight.shape[1])


def dequantize(packed: PackedWeight, columns: slice = slice(None)) -> torch.Tensor:
    """W^T [K, N'] in fp32 for the output ``columns``."""
    codes = unpack_codes(packed.qweight[:, columns], packed.bits).float()
    scales = packed.scales[:, columns].float().repeat_interleave(packed.group_size, dim=0)
    if packed.zeros is None:
        return (codes - 2 ** (packed.bits - 1)) * scales
    zeros = packed.zeros[:, columns].float().repeat_interleave(packed.group_size, dim=0)
    return (codes - zeros) * scales


def wna16_linear_reference(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 product with the dequantized weight, cast back to x's dtype."""
    out = x.float() @ dequantize(packed)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


def wna16_linear_cpu(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Slab-wise dequantize-then-matmul in x's dtype: memory stays O(K * slab), not O(K * N)."""
    n = packed.out_features
    slab = max(8, CPU_SLAB_ELEMENTS // max(packed.in_features, 1)) // 8 * 8
    out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    for start in range(0, n, slab):
        cols = slice(start, min(start + slab, n))
        torch.matmul(x, dequantize(packed, cols).to(x.dtype), out=out[..., cols])
    if bias is not None:
        out += bias.to(x.dtype)
    return out


GEMV_MAX_ROWS = 8  # the GEMV kernel keeps every row of x in one program


@dataclass(frozen=True)
class WNA16Config:
    """Tile sizes; ``gemv`` picks the row-broadcast kernel (rows <= GEMV_MAX_ROWS, block_m ignored)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    gemv: bool = False

    @property
    def name(self) -> str:
        kind = "gemv_" if self.gemv else f"m{self.block_m}_"
        return f"{kind}n{self.block_n}_k{self.block_k}_s{self.split_k}_w{self.num_warps}_st{self.num_stages}"


def default_config(rows: int, n: int, k: int, group_size: int, num_sms: int = 132) -> WNA16Config:
    """A config by shape: 16-row tiles and split-K for decode batches (fill the SMs), wider tiles above."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64 if rows <= 64 else 128
    block_k = min(128 if rows <= 16 else 64, group_size)
    tiles = -(-rows // block_m) * -(-n // block_n)
    split_k = 1
    while tiles * split_k < 2 * num_sms and k // (split_k * 2) >= max(block_k, 512):
        split_k *= 2
    return WNA16Config(block_m, block_n, block_k, split_k, 4, 3)


if HAS_TRITON:

    @triton.jit
    def _group_scale_zero(s_ptr, z_ptr, group, n, nmask, N, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr,
                          BLOCK_N: tl.constexpr):
        """One group's scales and zero points for the tile's columns, in fp32 (symmetric: zero 2^(bits-1))."""
        scale = tl.load(s_ptr + group * N + n, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + group * N + n, mask=nmask, other=0.0).to(tl.float32)
        else:
            zero = tl.full([BLOCK_N], 1 << (BITS - 1), tl.float32)
        return scale, zero

    @triton.jit
    def _store_tile(acc, b_ptr, out_ptr, m, n, mmask, nmask, stride_om, pid_k, HAS_BIAS: tl.constexpr,
                    SPLIT_K: tl.constexpr):
        """Bias (added once, by the first K split) and the store: plain, or atomic adds of fp32 partial sums."""
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = out_ptr + m[:, None] * stride_om + n[None, :]
        omask = mmask[:, None] & nmask[None, :]
        if SPLIT_K == 1:
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=omask)

    @triton.jit(do_not_specialize=["M"])
    def _wna16_gemm_kernel(
        x_ptr,
        qw_ptr,
        s_ptr,
        z_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        group_size,
        BITS: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_F32: tl.constexpr = False,  # splitk.dot_in_fp32: bf16 operands widened for Triton's interpreter
    ):
        PER_WORD: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m  # row tiles vary fastest: programs sharing a weight tile run together (L2 reuse)
        pid_n = pid // num_m
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = m < M
        nmask = n < N
        k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_begin = pid_k * k_span
        k_end = tl.minimum(k_begin + k_span, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < K
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            words = tl.load(qw_ptr + (k // PER_WORD)[:, None] * N + n[None, :],
                            mask=kmask[:, None] & nmask[None, :], other=0)
            codes = (words >> ((k % PER_WORD) * BITS)[:, None]) & MASK
            group = k0 // group_size  # BLOCK_K divides group_size: one group per step
            scale, zero = _group_scale_zero(s_ptr, z_ptr, group, n, nmask, N, BITS, HAS_ZEROS, BLOCK_N)
            w = ((codes.to(tl.float32) - zero[None, :]) * scale[None, :]).to(x.dtype)
            if DOT_F32:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(x, w, acc)
        _store_tile(acc, b_ptr, out_ptr, m, n, mmask, nmask, stride_om, pid_k, HAS_BIAS, SPLIT_K)


    @triton.jit(do_not_specialize=["M"])
    def _wna16_gemv_kernel(
        x_ptr,
        qw_ptr,
        s_ptr,
        z_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        group_size,
        BITS: tl.constexpr,
        HAS_ZEROS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SPLIT_K: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Few rows: each packed word is loaded once and unpacked by a broadcast shift ([words, per_word, n]),
        every row of x reuses the dequantized tile, products are summed over K in fp32 (no MMA padding to 16)."""
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        MASK: tl.constexpr = (1 << BITS) - 1
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, ROWS)
        mmask = m < M
        shifts = tl.arange(0, PER_WORD) * BITS
        k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_begin = pid_k * k_span
        k_end = tl.minimum(k_begin + k_span, K)
        acc = tl.zeros([ROWS, BLOCK_N], tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            rows = k0 // PER_WORD + tl.arange(0, WORDS)
            words = tl.load(qw_ptr + rows[:, None] * N + n[None, :],
                            mask=(rows < K // PER_WORD)[:, None] & nmask[None, :], other=0)
            codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & MASK, [BLOCK_K, BLOCK_N])
            group = k0 // group_size  # BLOCK_K divides group_size: one group per step
            scale, zero = _group_scale_zero(s_ptr, z_ptr, group, n, nmask, N, BITS, HAS_ZEROS, BLOCK_N)
            w = (codes.to(tl.float32) - zero[None, :]) * scale[None, :]
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & (k < K)[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        _store_tile(acc, b_ptr, out_ptr, m, n, mmask, nmask, stride_om, pid_k, HAS_BIAS, SPLIT_K)


def checked_input(x: torch.Tensor, packed: PackedWeight, what: str) -> torch.Tensor:
    """x [M, K] in bf16/fp16 with unit stride along K (ValueError otherwise); needs triton."""
    require_triton(what)
    if x.dim() != 2 or x.shape[1] != packed.in_features:
        raise ValueError(f"{what} needs x [M, {packed.in_features}]; got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{what} takes bf16/fp16 activations; got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def wna16_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, config: WNA16Config | None = None
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times the dequantized weight (+ bias) -> [M, N] in x's dtype, fp32 accumulation."""
    x = checked_input(x, packed, "wna16_linear")
    m, k = x.shape
    n = packed.out_features
    if config is None:
        config = default_config(m, n, k, packed.group_size)
    block_k = min(config.block_k, packed.group_size)
    while packed.group_size % block_k and block_k > 32 // packed.bits:  # one group (K) of an odd width
        block_k //= 2
    if packed.group_size % block_k:
        raise ValueError(f"block_k {block_k} must divide the group size {packed.group_size}")
    split = config.split_k > 1
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split else x.new_empty((m, n))
    if m == 0:
        return out.to(x.dtype)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    args = (x, packed.qweight, packed.scales, zeros, bias if bias is not None else packed.scales, out,
            m, n, k, x.stride(0), out.stride(0), packed.group_size)
    common = dict(BITS=packed.bits, HAS_ZEROS=packed.zeros is not None, HAS_BIAS=bias is not None,
                  SPLIT_K=config.split_k, BLOCK_N=config.block_n, BLOCK_K=block_k, num_warps=config.num_warps,
                  num_stages=config.num_stages)
    if config.gemv:
        if m > GEMV_MAX_ROWS:
            raise ValueError(f"the W{packed.bits}A16 GEMV takes at most {GEMV_MAX_ROWS} rows; got {m}")
        grid = (triton.cdiv(n, config.block_n), config.split_k)
        _wna16_gemv_kernel[grid](*args, ROWS=max(2, next_power_of_2(m)), **common)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n), config.split_k)
        _wna16_gemm_kernel[grid](*args, BLOCK_M=config.block_m, DOT_F32=dot_in_fp32(x.dtype), **common)
    return out.to(x.dtype) if split else out
