"""Dequantize a K-major 4-bit weight (kernels/w4_gemv.py's KMajorWeight) to a dense [N, K] tile in x's dtype, then
cuBLAS: the K-major layout's path for many rows (prefill chunks), where the product is compute-bound and
writing + reading the dense copy once costs less than dequantizing in every output tile's K loop.

A program covers BLOCK_N output channels x WORDS words of one group (WORDS = min(group words, 16)); nibble
j = 2 t + e of word w of group g is input channel S g + 2 GW t + 2 w + e (KMajorWeight's interleave), so the codes
are built as a [BLOCK_N, 4, WORDS, 2] tile whose (w, e) run is contiguous in the output row, flattened to
[BLOCK_N, 8 WORDS] for the store: for groups up to 128 (one chunk a group) a row's whole group is one contiguous
run (vector stores), above it four runs of 2 WORDS. W[n, k] = (code - zero) * scale in fp32, rounded once to x's dtype.
tests/kernels/test_w4_kmajor_dequant.py compares it with kernels/w4_gemv.py's ``dequantize_k_major``.

The dense copy is 4x the codes' bytes: written once a call and read once by cuBLAS, it costs more HBM traffic than
the product at decode row counts. ``chunk_n`` (under trial, benchmarks/gpu_w4_gemv_probe.py) dequantizes
``chunk_n`` output channels at a time into one reused buffer that cuBLAS reads straight after, while it is still
in L2 (H100: 50 MB; 2048 x 4096 bf16 is 16 MB), writing its slice of the output in place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON, tl, triton
from tokenmill.kernels.w4_gemv import KMajorWeight
from tokenmill.kernels.wna16_gemm import checked_input

MAX_WORDS = 16  # words of a group one program dequantizes (a whole group up to group size 128)


@dataclass(frozen=True)
class KMajorDequantConfig:
    """The dequantize kernel's tile: ``block_n`` output channels a program (a power of two); ``chunk_n``: output
    channels dequantized and multiplied at a time through one reused buffer (0: the whole weight at once);
    ``k_first``: consecutive programs walk along K (one block of rows written left to right, whole rows in a
    short window) instead of down N."""

    block_n: int = 32
    num_warps: int = 4
    chunk_n: int = 0
    k_first: bool = False

    def __post_init__(self) -> None:
        if self.block_n < 1 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two; got {self.block_n}")
        if self.chunk_n < 0:
            raise ValueError(f"chunk_n must be >= 0 (0: the whole weight at once); got {self.chunk_n}")

    @property
    def name(self) -> str:
        chunk = f"_c{self.chunk_n}" if self.chunk_n else ""
        return f"dequant_n{self.block_n}_w{self.num_warps}{chunk}{'_kf' if self.k_first else ''}"


if HAS_TRITON:

    @triton.jit
    def _kmajor_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G,
                               HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, GW: tl.constexpr,
                               WORDS: tl.constexpr, K_FIRST: tl.constexpr):
        if K_FIRST:
            chunk = tl.program_id(0)
            pid_n = tl.program_id(1)
        else:
            pid_n = tl.program_id(0)
            chunk = tl.program_id(1)
        kw = K // 8
        first = chunk * WORDS  # the chunk's first word along K; WORDS divides GW, so one group
        group = first // GW
        n4 = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[:, None, None, None]
        t4 = tl.arange(0, 4)[None, :, None, None]
        w4 = (first % GW + tl.arange(0, WORDS))[None, None, :, None]
        e4 = tl.arange(0, 2)[None, None, None, :]
        nmask = n4 < N
        words = tl.load(qw_ptr + n4 * kw + group * GW + w4, mask=nmask, other=0)  # [BLOCK_N, 1, WORDS, 1]
        codes = (words >> (4 * (2 * t4 + e4))) & 0xF  # the mask drops an arithmetic shift's sign bits
        scale = tl.load(s_ptr + n4 * G + group, mask=nmask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(z_ptr + n4 * G + group, mask=nmask, other=0.0).to(tl.float32)
        else:
            zero = tl.full([BLOCK_N, 1, 1, 1], 8.0, tl.float32)
        value = tl.reshape(((codes.to(tl.float32) - zero) * scale).to(out_ptr.dtype.element_ty),
                           [BLOCK_N, 8 * WORDS])  # column c = 2 WORDS t + 2 w + e
        c = tl.arange(0, 8 * WORDS)
        if WORDS == GW:  # the chunk is the whole group: its columns are the group's, in order
            k = group * (8 * GW) + c
        else:  # four runs of 2 WORDS columns, 2 GW apart
            k = group * (8 * GW) + 2 * GW * (c // (2 * WORDS)) + 2 * (first % GW) + c % (2 * WORDS)
        n2 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        tl.store(out_ptr + n2 * K + k[None, :], value, mask=n2 < N)


def dequantize_k_major_dense(weight: KMajorWeight, dtype: torch.dtype, config: KMajorDequantConfig | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in ``dtype`` (the layout F.linear takes) from the K-major codes, by one Triton launch; into
    ``out`` (contiguous [N, K] of ``dtype``) when given."""
    config = config or KMajorDequantConfig()
    n, k = weight.out_features, weight.in_features
    gw = weight.group_size // 8
    words = min(gw, MAX_WORDS)
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=weight.qweight.device)
    elif out.shape != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] {dtype} tensor; got {tuple(out.shape)} {out.dtype}")
    if n == 0 or k == 0:
        return out
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    grid = (triton.cdiv(n, config.block_n), k // 8 // words)
    _kmajor_dequant_kernel[grid[::-1] if config.k_first else grid](
        weight.qweight, weight.scales, zeros, out, n, k, k // weight.group_size,
        HAS_ZEROS=weight.zeros is not None, BLOCK_N=config.block_n, GW=gw, WORDS=words, K_FIRST=config.k_first,
        num_warps=config.num_warps)
    return out


def w4_kmajor_dequant_mm(x: torch.Tensor, weight: KMajorWeight, config: KMajorDequantConfig | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times the dequantized weight (+ bias) by cuBLAS -> [M, N] in x's dtype."""
    config = config or KMajorDequantConfig()
    x = checked_input(x, weight, "w4_kmajor_dequant_mm")
    n = weight.out_features
    if not config.chunk_n or config.chunk_n >= n:
        return F.linear(x, dequantize_k_major_dense(weight, x.dtype, config), bias)
    out = torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)
    buffer = torch.empty((config.chunk_n, weight.in_features), dtype=x.dtype, device=x.device)
    for start in range(0, n, config.chunk_n):
        end = min(start + config.chunk_n, n)
        dense = dequantize_k_major_dense(_channels(weight, start, end), x.dtype, config, buffer[:end - start])
        # out[:, start:end] is a row-major view with leading stride n: cuBLAS writes it in place
        if bias is None:
            torch.mm(x, dense.t(), out=out[:, start:end])
        else:
            torch.addmm(bias[start:end], x, dense.t(), out=out[:, start:end])
    return out


def _channels(weight: KMajorWeight, start: int, end: int) -> KMajorWeight:
    """Output channels [start, end) of ``weight``: row views of its tensors (the kernel's row strides hold)."""
    zeros = weight.zeros[start:end] if weight.zeros is not None else None
    return replace(weight, qweight=weight.qweight[start:end], scales=weight.scales[start:end], zeros=zeros)
