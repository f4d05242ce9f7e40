"""Weight-streaming W4A16 / W8A16 kernel for decode batches, on kernels/wna16_gemm.py's packed layout.

Each program streams a [BLOCK_K / per_word, BLOCK_N] tile of packed words per step (rows of int32 words are
contiguous along N: wide coalesced loads), for its share of K (split-K, reduced in the same launch by
kernels/splitk.py). Codes are unpacked with one shift and one and-or per nibble into the mantissa of 2^23
(``code | 0x4B000000`` read as fp32 is 2^23 + code, so one subtraction converts it: no slow int-to-float
instruction). Scales and zero points are applied once per group, not per weight, by factoring the group's sum:

    sum_k x_k (c_kn - z_n) s_n = s_n (sum_k x_k c_kn - z_n sum_k x_k)

- ``dot=False`` (1-16 rows): fp32 FMAs of every row against the unpacked tile, partial sums kept per word row
  and reduced once at the end.
- ``dot=True`` (16+ rows): one tensor-core product per nibble position (x's columns k = word * per_word + j
  gathered with a stride), so the tile needs no reshuffle; groups narrower than the K step (4-bit group 32/64)
  scale each word row before the product instead.
"""

from __future__ import annotations

import torch

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, tl, triton
from tokenmill.kernels.splitk import KINDS, SplitKConfig, dot_in_fp32, fit_split_k, splitk_workspace
from tokenmill.kernels.wna16_gemm import PackedWeight, checked_input

if HAS_TRITON:
    from tokenmill.kernels.splitk import splitk_finish, stack_rows

    @triton.jit
    def _codes(words, j, BITS: tl.constexpr):
        """The j-th code of every word as fp32: ``code | 0x4B000000`` read as fp32 is 2^23 + code."""
        return ((((words >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True)
                - 8388608.0)

    @triton.jit
    def _row_fma(acc, x_ptr, row, M, stride_xm, kj, c):
        """Row ``row`` of x against the j-th codes of the words: acc [KW, N] += x[k(kw, j)] * c; also returns
        those x values (the caller sums them for the zero-point term). Rows past M read zeros."""
        xj = tl.load(x_ptr + row * stride_xm + kj, mask=(row + 0 * kj) < M, other=0.0).to(tl.float32)
        return acc + xj[:, None] * c, xj

    @triton.jit(do_not_specialize=["M"])
    def _wna16_splitk_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_om, group_size,
        BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, KIND: tl.constexpr,
        SCALE_ROWS: tl.constexpr, DOT_F32: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        """KIND 0 rows, 1 fma, 2 dot, 3 dot_k (see SplitKConfig)."""
        PER_WORD: tl.constexpr = 32 // BITS
        KW: tl.constexpr = BLOCK_K // PER_WORD
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m  # row tiles vary fastest: programs sharing a weight tile run together (L2 reuse)
        pid_n = pid // num_m
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = m < M
        nmask = n < N
        kw = tl.arange(0, KW)
        steps = K // BLOCK_K
        per_split = tl.cdiv(steps, SPLIT_K)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, steps)
        x_rows = x_ptr + m[:, None] * stride_xm
        row0 = pid_m * BLOCK_M
        if KIND == 0:  # one [KW, N] accumulator per row, in the words' layout
            acc0 = tl.zeros([KW, BLOCK_N], tl.float32)
            acc1 = tl.zeros([KW, BLOCK_N], tl.float32)
            acc2 = tl.zeros([KW, BLOCK_N], tl.float32)
            acc3 = tl.zeros([KW, BLOCK_N], tl.float32)
        elif KIND == 1:
            acc = tl.zeros([BLOCK_M, KW, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        offset = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # sum over groups of s * z * (sum of x in the group)
        if PREFETCH:  # next step's words are loaded before this step's are used: two tiles in flight
            ahead = tl.load(qw_ptr + (first * KW + kw)[:, None] * N + n[None, :],
                            mask=((first + 0 * kw) < last)[:, None] & nmask[None, :], other=0)
        for step in range(first, last):
            k0 = step * BLOCK_K
            if PREFETCH:
                words = ahead
                ahead = tl.load(qw_ptr + ((step + 1) * KW + kw)[:, None] * N + n[None, :],
                                mask=((step + 1 + 0 * kw) < last)[:, None] & nmask[None, :], other=0)
            else:
                words = tl.load(qw_ptr + (step * KW + kw)[:, None] * N + n[None, :], mask=nmask[None, :], other=0)
            if KIND == 0:
                if SCALE_ROWS:  # several groups per step: each word row's group
                    g = (k0 + kw * PER_WORD) // group_size
                    sc = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=nmask[None, :], other=0.0).to(tl.float32)
                    if HAS_ZEROS:
                        zc = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=nmask[None, :], other=0.0)
                        zc = zc.to(tl.float32)
                    else:
                        zc = tl.full([KW, BLOCK_N], 1 << (BITS - 1), tl.float32)
                else:
                    group = k0 // group_size
                    sc = tl.load(s_ptr + group * N + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
                    if HAS_ZEROS:
                        zc = tl.load(z_ptr + group * N + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
                    else:
                        zc = tl.full([1, BLOCK_N], 1 << (BITS - 1), tl.float32)
                p0 = tl.zeros([KW, BLOCK_N], tl.float32)
                p1 = tl.zeros([KW, BLOCK_N], tl.float32)
                p2 = tl.zeros([KW, BLOCK_N], tl.float32)
                p3 = tl.zeros([KW, BLOCK_N], tl.float32)
                s0 = tl.zeros([KW], tl.float32)
                s1 = tl.zeros([KW], tl.float32)
                s2 = tl.zeros([KW], tl.float32)
                s3 = tl.zeros([KW], tl.float32)
                for j in tl.static_range(PER_WORD):
                    c = _codes(words, j, BITS)
                    kj = k0 + kw * PER_WORD + j
                    p0, x0 = _row_fma(p0, x_ptr, row0, M, stride_xm, kj, c)
                    s0 += x0
                    if BLOCK_M > 1:
                        p1, x1 = _row_fma(p1, x_ptr, row0 + 1, M, stride_xm, kj, c)
                        s1 += x1
                    if BLOCK_M > 2:
                        p2, x2 = _row_fma(p2, x_ptr, row0 + 2, M, stride_xm, kj, c)
                        s2 += x2
                        p3, x3 = _row_fma(p3, x_ptr, row0 + 3, M, stride_xm, kj, c)
                        s3 += x3
                acc0 += (p0 - s0[:, None] * zc) * sc
                if BLOCK_M > 1:
                    acc1 += (p1 - s1[:, None] * zc) * sc
                if BLOCK_M > 2:
                    acc2 += (p2 - s2[:, None] * zc) * sc
                    acc3 += (p3 - s3[:, None] * zc) * sc
            elif SCALE_ROWS:  # several groups per step (dot kinds): scale the codes before the product
                if KIND == 3:
                    kk = k0 + tl.arange(0, BLOCK_K)
                    shifts = tl.arange(0, PER_WORD) * BITS
                    codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1),
                                       [BLOCK_K, BLOCK_N])
                    c = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    g = kk // group_size
                    scale2 = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=nmask[None, :], other=0.0)
                    if HAS_ZEROS:
                        zero2 = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=nmask[None, :], other=0.0)
                        w = (c - zero2.to(tl.float32)) * scale2.to(tl.float32)
                    else:
                        w = (c - (1 << (BITS - 1))) * scale2.to(tl.float32)
                    xk = tl.load(x_rows + kk[None, :], mask=mmask[:, None], other=0.0)
                    if DOT_F32:
                        acc = tl.dot(xk.to(tl.float32), w, acc, input_precision="ieee")
                    else:
                        acc = tl.dot(xk, w.to(xk.dtype), acc)
                else:
                    g = (k0 + kw * PER_WORD) // group_size
                    scale2 = tl.load(s_ptr + g[:, None] * N + n[None, :], mask=nmask[None, :], other=0.0)
                    scale2 = scale2.to(tl.float32)
                    if HAS_ZEROS:
                        zero2 = tl.load(z_ptr + g[:, None] * N + n[None, :], mask=nmask[None, :], other=0.0)
                        zero2 = zero2.to(tl.float32)
                    else:
                        zero2 = tl.full([KW, BLOCK_N], 1 << (BITS - 1), tl.float32)
                    for j in tl.static_range(PER_WORD):
                        w = (_codes(words, j, BITS) - zero2) * scale2
                        xj = tl.load(x_rows + (k0 + kw * PER_WORD + j)[None, :], mask=mmask[:, None], other=0.0)
                        if DOT_F32:
                            acc = tl.dot(xj.to(tl.float32), w, acc, input_precision="ieee")
                        else:
                            acc = tl.dot(xj, w.to(xj.dtype), acc)
            else:
                group = k0 // group_size  # BLOCK_K divides the group size: one group per step
                scale = tl.load(s_ptr + group * N + n, mask=nmask, other=0.0).to(tl.float32)
                if HAS_ZEROS:
                    zero = tl.load(z_ptr + group * N + n, mask=nmask, other=0.0).to(tl.float32)
                else:
                    zero = tl.full([BLOCK_N], 1 << (BITS - 1), tl.float32)
                if KIND == 3:
                    shifts = tl.arange(0, PER_WORD) * BITS
                    codes = tl.reshape((words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1),
                                       [BLOCK_K, BLOCK_N])
                    c = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    xk = tl.load(x_rows + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mmask[:, None], other=0.0)
                    if DOT_F32:
                        part = tl.dot(xk.to(tl.float32), c, input_precision="ieee")
                    else:  # codes 0..2^bits-1 are exact in bf16/fp16
                        part = tl.dot(xk, c.to(xk.dtype))
                    acc += part * scale[None, :]
                    offset += tl.sum(xk.to(tl.float32), axis=1)[:, None] * (scale * zero)[None, :]
                else:
                    xsum = tl.zeros([BLOCK_M, KW], tl.float32)
                    if KIND == 2:
                        part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                    else:
                        part = tl.zeros([BLOCK_M, KW, BLOCK_N], tl.float32)
                    for j in tl.static_range(PER_WORD):
                        c = _codes(words, j, BITS)
                        xj = tl.load(x_rows + (k0 + kw * PER_WORD + j)[None, :], mask=mmask[:, None], other=0.0)
                        if KIND == 2:
                            if DOT_F32:
                                part = tl.dot(xj.to(tl.float32), c, part, input_precision="ieee")
                            else:
                                part = tl.dot(xj, c.to(xj.dtype), part)
                        else:
                            part += xj.to(tl.float32)[:, :, None] * c[None, :, :]
                        xsum += xj.to(tl.float32)
                    if KIND == 2:
                        acc += part * scale[None, :]
                    else:
                        acc += part * scale[None, None, :]
                    offset += tl.sum(xsum, axis=1)[:, None] * (scale * zero)[None, :]
        if KIND == 0:
            result = stack_rows(acc0, acc1, acc2, acc3, 0, BLOCK_M)
        elif KIND == 1:
            result = tl.sum(acc, axis=1) - offset
        else:
            result = acc - offset
        splitk_finish(result, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, pid, pid_k, HAS_BIAS,
                      SPLIT_K)


def wna16_splitk_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, config: SplitKConfig | None = None
) -> torch.Tensor:
    """x [M, K] (bf16/fp16) times the dequantized weight (+ bias) -> [M, N] in x's dtype, fp32 accumulation."""
    x = checked_input(x, packed, "wna16_splitk_linear")
    m, k = x.shape
    n = packed.out_features
    if config is None:
        config = SplitKConfig(block_m=max(1, next_power_of_2(m))) if m <= 4 else SplitKConfig(block_m=16, kind="dot")
    per_word = 32 // packed.bits
    block_k = config.block_k
    if config.kind == "dot":
        block_k = max(block_k, 16 * per_word)  # tl.dot needs K >= 16: 16 words per nibble position
    elif config.kind == "dot_k":
        block_k = max(block_k, 16, per_word)
    elif config.kind == "fma":
        block_k = min(block_k, packed.group_size)
    while k % block_k and block_k > per_word:  # one group (K) of an odd width
        block_k //= 2
    scale_rows = block_k > packed.group_size
    if k % block_k or (not scale_rows and packed.group_size % block_k) or (scale_rows and config.kind == "fma"):
        raise ValueError(f"no K step fits K {k} and group size {packed.group_size} with block_k {config.block_k}")
    if config.kind == "dot" and block_k // per_word < 16:  # the halving above went under tl.dot's K of 16
        raise ValueError(f"the 'dot' kind needs K >= {16 * per_word} at {packed.bits} bits (16 words a product); "
                         f"K is {k}")
    block_m = max(16, config.block_m) if config.dot else config.block_m
    out = x.new_empty((m, n))
    if m == 0:
        return out
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, config.block_n)
    split_k = fit_split_k(config.split_k, m, n, tiles, k // block_k)
    work = splitk_workspace(x.device)
    zeros = packed.zeros if packed.zeros is not None else packed.scales
    _wna16_splitk_kernel[(tiles, split_k)](
        x, packed.qweight, packed.scales, zeros, bias if bias is not None else packed.scales, out,
        work.partials, work.counters, m, n, k, x.stride(0), out.stride(0), packed.group_size,
        BITS=packed.bits, HAS_ZEROS=packed.zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, KIND=KINDS.index(config.kind), SCALE_ROWS=scale_rows,
        DOT_F32=dot_in_fp32(x.dtype), PREFETCH=config.prefetch,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
