"""Tensor-core W4A16 GEMM on the K-major repacked layout (kernels/w4_gemv.py's ``repack_k_major``), for 8 to a
few hundred rows: with it, one 4-bit copy of each weight serves every batch size (the ``kmajor`` FMA GEMV up to
~4 rows, this kernel past them) instead of keeping the GPTQ layout beside the repack (twice the 4-bit bytes).

Layout read (see KMajorWeight): int32 words [N, K / 8], each output channel's words contiguous along K; with
GW = group_size / 8 words a group, nibble j of word w of group g holds input channel

    k = group_size * g + 2 GW (j // 2) + 2 w + j % 2

(for group 128: k = 128 g + 32 (j // 2) + 2 w + j % 2). A program streams [KW = BLOCK_K / 8, BLOCK_N] word tiles
(each channel's KW words one contiguous run) over its share of K (split-K reduced in the same launch by
kernels/splitk.py where there are too few output tiles for the SMs) and gathers x's columns in the words' order,
so the codes never move between nibble positions:

- ``one_dot=True``: the eight nibbles of every word become rows 8 w + j of one [BLOCK_K, BLOCK_N] code tile (one
  shift-and-mask with a broadcast shift), one tensor-core product a K step against x in that order: gathered
  column pair by column pair (``x_runs=False``), or (``x_runs=True``) loaded as the step's four contiguous runs
  of 2 KW columns (wide loads; a step's columns are 2 GW t + 2 w + e) and reordered in registers ([t, w, e] ->
  [w, t, e], a layout conversion the operand's trip through shared memory may absorb);
- ``one_dot=False``: one product a nibble position ([BLOCK_M, KW] x [KW, BLOCK_N]; KW >= 16, so group >= 128),
  x's columns for nibble j at stride 2 (no reshape of the code tile).

A code becomes a 16-bit float ``magic + code`` by one and-or (bf16 0x4300 | c = 128 + c, fp16 0x6400 | c = 1024 + c:
exact), so the product is sum x (magic + c); a K step never crosses a group (BLOCK_K is capped at the group size)
and adds s (part - (magic + z) sum x) in fp32: scale and zero point once a group and channel, not once a weight.
That keeps a second [BLOCK_M, BLOCK_N] fp32 tile live beside the accumulator (registers spill at 128 x 128 tiles:
sm_90 compiles without a GPU), so for many rows ``scale_codes=True`` instead makes every code (c - z) s in fp32
(2^23-magic conversion, one FMA) rounded to x's dtype, and chains one accumulator through the products.
``w_lhs=True`` computes the transposed product acc [BLOCK_N, BLOCK_M] = codes [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K,
BLOCK_M] and stores acc transposed: on Hopper a wgmma's right operand must sit in shared memory, its left one may be
in registers, so the dequantized tile goes left. Word tiles load as [BLOCK_N, KW] (contiguous rows, 16-byte loads
with the row stride an argument); a row's words are spread over TW = min(4, KW) lanes as the 16-bit operand
fragment spreads a row's K (a lane holds columns 2 t, 2 t + 1 of every 8), so code column 8 TW q + 2 TW p + 2 t + e
is nibble 2 p + e of word TW q + t and each lane's codes come from its own words; x^T is gathered to match (runs of
2 TW columns: 16-byte loads at TW = 4). Scale and zero point as above (``scale_codes`` or after each step's
product). On triton 3.6 (the device's) and 3.9 for sm_90 the codes still reach the tensor cores through shared
memory (Triton stores the dequantized tile, then loads it in the operand's layout: ldmatrix), at 128-255 registers
a thread, so the compiler does not realize the saving. ``gluon=True`` runs the same product from
kernels/w4_kmajor_gluon.py, written with explicit layouts so the codes are built in the operand's register layout:
on the H100 (benchmarks/results/gpu_w4_gemv_probe_h100_2026-12-07_s19.json) it won 16-128 rows, e.g. the four
Llama-3-8B projections at 64 rows in 196 us against 292 us for this module's best and 165 us for bf16.
Accumulation is fp32. tests/kernels/test_w4_kmajor_gemm.py compares it with the fp32 product of x and the
dequantized weight; benchmarks/gpu_w4_gemv_probe.py times it at 8-256 rows (``w_lhs`` from 16). kernels/quant_dispatch.py's
``kmajor_cuda_linear`` serves 5-256 rows of K-major weights with it (the H100 probe's winners are table entries).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, tl, triton
from tokenmill.kernels.splitk import dot_in_fp32, fit_split_k, splitk_workspace
from tokenmill.kernels.w4_gemv import KMajorWeight
from tokenmill.kernels.w4_kmajor_gluon import HAS_GLUON
from tokenmill.kernels.w4_kmajor_gluon_ring import ring_block_k
from tokenmill.kernels.wna16_gemm import checked_input


@dataclass(frozen=True)
class KMajorGemmConfig:
    """One launch's tiles: ``block_m`` rows (>= 16, tl.dot's M; its N with ``w_lhs``), ``block_n`` channels,
    ``block_k`` inputs a K step (capped at the group size), K split over ``split_k`` programs (lowered to what the
    workspace holds and what K offers), ``one_dot``, ``x_runs``, ``scale_codes`` and ``w_lhs`` (the transposed
    product; default off, so table entries written before it keep their kernel) as in the module docstring;
    ``gluon``: the transposed product from kernels/w4_kmajor_gluon.py (CUDA only; ``num_stages`` unused);
    ``pipelined`` (with ``gluon``): kernels/w4_kmajor_gluon_ring.py's version (an x ring of ``num_stages`` >= 3
    stages, asynchronous wgmma, codes scaled before the product: ``scale_codes`` is implied); ``weight_ring`` (with
    ``pipelined``): the packed words ride the same cp.async ring as x, ``num_stages - 2`` steps ahead, instead of
    loads one step ahead into registers (groups of 32-128); ``pair_dequant`` (with ``pipelined``): two codes a
    register in x's dtype (bf16x2 / f16x2 arithmetic, the fp32 path's exact result) where the weight's zero points
    are integers (``KMajorWeight.integer_zeros``; the fp32 path otherwise); ``register_a`` (with ``weight_ring``):
    the codes go to the wgmma as its register A operand, two steps a loop iteration (no shared-memory round trip);
    ``finish_rows`` (with ``pipelined``, split K): the last split sums the partials that many channels at a time in
    a blocked layout instead of a second tile in the accumulator's (0: the whole tile; sm_90 compiles: 128 x 128 and
    256-row tiles split over K then spill no more, and 64 x 128 split 8 holds 162 registers instead of 250)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    one_dot: bool = True
    num_warps: int = 4
    num_stages: int = 3
    x_runs: bool = True
    scale_codes: bool = False
    w_lhs: bool = False
    gluon: bool = False
    pipelined: bool = False
    weight_ring: bool = False
    pair_dequant: bool = False
    register_a: bool = False
    finish_rows: int = 0

    def __post_init__(self) -> None:
        for field, value, low in (("block_m", self.block_m, 16), ("block_n", self.block_n, 16),
                                  ("block_k", self.block_k, 16)):
            if value < low or value & (value - 1):
                raise ValueError(f"{field} must be a power of two >= {low} (tl.dot's smallest tile); got {value}")
        if not self.one_dot and self.block_k < 128:
            raise ValueError(f"one_dot=False needs block_k >= 128 (16 words a nibble product); got {self.block_k}")
        if self.x_runs and not self.one_dot:
            raise ValueError("x_runs=True is a variant of one_dot=True only (one_dot=False loads x at stride 2)")
        if self.scale_codes and not self.one_dot:
            raise ValueError("scale_codes=True is a variant of one_dot=True only")
        if self.w_lhs and (self.x_runs or not self.one_dot):
            raise ValueError("w_lhs=True takes one_dot=True, x_runs=False (it loads x's columns in runs of its own)")
        if self.gluon and (not self.w_lhs or self.scale_codes):
            raise ValueError("gluon=True is the w_lhs=True product written in Gluon (scaled after the product only)")
        if self.gluon and (self.block_n % (16 * self.num_warps) or self.block_m > 256):
            raise ValueError(f"gluon=True needs block_n a multiple of 16 x num_warps (a wgmma warpgroup's 4 warps "
                             f"take 64 channels) and block_m <= 256; got {self.block_n}, {self.num_warps} warps, "
                             f"{self.block_m}")
        if self.pipelined and (not self.gluon or self.num_stages < 3):
            raise ValueError(f"pipelined=True is a gluon=True variant with num_stages >= 3 (an x ring of that many "
                             f"stages); got gluon={self.gluon}, num_stages={self.num_stages}")
        if self.weight_ring and not self.pipelined:
            raise ValueError("weight_ring=True is a pipelined=True variant (the words join its cp.async ring)")
        if self.pair_dequant and not self.pipelined:
            raise ValueError("pair_dequant=True is a pipelined=True variant")
        if self.register_a and not self.weight_ring:
            raise ValueError("register_a=True is a weight_ring=True variant")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1; got {self.split_k}")
        rows = self.finish_rows
        if rows and (not self.pipelined or rows < 32 or rows & (rows - 1) or self.block_n % rows):
            raise ValueError(f"finish_rows is a pipelined=True variant: 0, or a power of two >= 32 (a warp's lanes) "
                             f"that divides block_n; got {self.finish_rows} with block_n {self.block_n}")

    @property
    def name(self) -> str:
        if not self.w_lhs:
            variant = f"{'' if self.one_dot else '_j'}{'_r' if self.x_runs else ''}"
        elif self.pipelined:
            variant = (f"_wlgp{'w' if self.weight_ring else ''}{'2' if self.pair_dequant else ''}"
                       f"{'r' if self.register_a else ''}")
        else:
            variant = "_wlg" if self.gluon else "_wl"
        return (f"kmgemm{variant}{'_sc' if self.scale_codes else ''}_m{self.block_m}_n{self.block_n}_k{self.block_k}"
                f"_s{self.split_k}_w{self.num_warps}_st{self.num_stages}"
                f"{f'_f{self.finish_rows}' if self.finish_rows else ''}")


if HAS_GLUON:
    from tokenmill.kernels.w4_kmajor_gluon import _kmajor_gemm_gluon_kernel
    from tokenmill.kernels.w4_kmajor_gluon_ring import _kmajor_gemm_gluon_ring_kernel
if HAS_TRITON:  # the Triton kernels need no Gluon (an older Triton has none)
    from tokenmill.kernels.splitk import splitk_finish, splitk_tile

    @triton.jit
    def _magic16(codes, MAGIC_BITS: tl.constexpr, dtype: tl.constexpr):
        """4-bit codes (int32, already masked) as 16-bit floats magic + code."""
        return (codes | MAGIC_BITS).to(tl.int16).to(dtype, bitcast=True)

    @triton.jit
    def _split_steps(K, pid_k, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """[first, last) K steps of split ``pid_k`` (the last split may have fewer steps, or none)."""
        steps = K // BLOCK_K
        per_split = tl.cdiv(steps, SPLIT_K)
        first = pid_k * per_split
        return first, tl.minimum(first + per_split, steps)

    @triton.jit
    def _product(a, b, acc, DOT_F32: tl.constexpr):
        """acc + a @ b in fp32 (fp32 operands under the interpreter, which multiplies bf16's raw storage)."""
        if DOT_F32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit(do_not_specialize=["M"])
    def _kmajor_gemm_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_om,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GW: tl.constexpr, MAGIC_BITS: tl.constexpr,
        MAGIC: tl.constexpr, ONE_DOT: tl.constexpr, X_RUNS: tl.constexpr, SCALE_CODES: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """Program (output tile, K split). Words [KW, BLOCK_N] at qw[n, step KW + kw]; scales / zeros [N, G]."""
        KW: tl.constexpr = BLOCK_K // 8
        S: tl.constexpr = GW * 8  # the group size
        m, n, mmask, nmask = splitk_tile(M, N, BLOCK_M, BLOCK_N)
        pid_k = tl.program_id(1)
        kwords = K // 8
        groups = K // S
        first, last = _split_steps(K, pid_k, BLOCK_K, SPLIT_K)
        dtype = x_ptr.dtype.element_ty
        x_rows = x_ptr + m[:, None] * stride_xm
        kw = tl.arange(0, KW)
        j = tl.arange(0, 8)
        # x columns of the codes, relative to the step's first: code row 8 w + j holds column 2 GW (j // 2) + 2 w + j % 2
        gather = tl.reshape((2 * kw)[:, None] + (2 * GW * (j // 2) + j % 2)[None, :], [BLOCK_K])
        runs = (2 * GW * tl.arange(0, 4))[:, None] + tl.arange(0, 2 * KW)[None, :]  # [t, 2 w + e]: 4 runs of 2 KW
        w_at = qw_ptr + n[None, :] * kwords + kw[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for step in range(first, last):
            step_word = step * KW  # the step's words sit in one group (BLOCK_K divides it)
            col0 = (step_word // GW) * S + 2 * (step_word % GW)  # x column of the step's first word's nibble 0
            words = tl.load(w_at + step_word, mask=nmask[None, :], other=0)  # [KW, BLOCK_N]
            group = step_word // GW
            scale = tl.load(s_ptr + n * groups + group, mask=nmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + n * groups + group, mask=nmask, other=0.0).to(tl.float32)
            else:
                zero = tl.full([BLOCK_N], 8.0, tl.float32)
            if ONE_DOT:
                codes = (words[:, None, :] >> (4 * j)[None, :, None]) & 0xF  # [KW, 8, BLOCK_N]: row 8 w + j
                if SCALE_CODES:  # (c - z) s a weight, one accumulator chained through the products
                    c = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + c, minus 2^23
                    b = tl.reshape((c * scale[None, None, :] - (zero * scale)[None, None, :]).to(dtype),
                                   [BLOCK_K, BLOCK_N])
                else:
                    b = tl.reshape(_magic16(codes, MAGIC_BITS, dtype), [BLOCK_K, BLOCK_N])
                if X_RUNS:  # contiguous runs of x (wide loads), put into the codes' order in registers
                    x3 = tl.load(x_rows[:, :, None] + col0 + runs[None, :, :], mask=mmask[:, None, None], other=0.0)
                    xk = tl.reshape(tl.permute(tl.reshape(x3, [BLOCK_M, 4, KW, 2]), (0, 2, 1, 3)),
                                    [BLOCK_M, BLOCK_K])
                    if not SCALE_CODES:
                        xsum = tl.sum(tl.sum(x3.to(tl.float32), axis=2), axis=1)
                else:  # x gathered in the codes' order (pairs of neighbouring columns)
                    xk = tl.load(x_rows + col0 + gather[None, :], mask=mmask[:, None], other=0.0)
                    if not SCALE_CODES:
                        xsum = tl.sum(xk.to(tl.float32), axis=1)
                if SCALE_CODES:
                    acc = _product(xk, b, acc, DOT_F32)
                else:
                    part = _product(xk, b, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), DOT_F32)
                    acc += (part - xsum[:, None] * (MAGIC + zero)[None, :]) * scale[None, :]
            else:
                part = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                xs = tl.zeros([BLOCK_M, KW], tl.float32)
                for jj in tl.static_range(8):
                    c = _magic16((words >> (4 * jj)) & 0xF, MAGIC_BITS, dtype)
                    xj = tl.load(x_rows + col0 + (2 * kw + (2 * GW * (jj // 2) + jj % 2))[None, :],
                                 mask=mmask[:, None], other=0.0)
                    part = _product(xj, c, part, DOT_F32)
                    xs += xj.to(tl.float32)
                xsum = tl.sum(xs, axis=1)
                acc += (part - xsum[:, None] * (MAGIC + zero)[None, :]) * scale[None, :]
        splitk_finish(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, tl.program_id(0), pid_k, HAS_BIAS, SPLIT_K)

    @triton.jit(do_not_specialize=["M"])
    def _kmajor_gemm_lhs_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_om,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GW: tl.constexpr, TW: tl.constexpr, MAGIC_BITS: tl.constexpr,
        MAGIC: tl.constexpr, SCALE_CODES: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """w_lhs=True: acc [BLOCK_N, BLOCK_M] = codes [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M], stored transposed.
        Code column c = 8 TW q + 2 TW p + 2 t + e holds nibble 2 p + e of word TW q + t (TW = min(4, KW) lanes a
        row: the 16-bit dot operand's fragment gives a lane columns 2 t, 2 t + 1 of every 8, so each lane holds
        whole words); its x column is the step's 2 GW p + 2 TW q + (c mod 2 TW), runs of 2 TW."""
        KW: tl.constexpr = BLOCK_K // 8
        S: tl.constexpr = GW * 8  # the group size
        STEPS_A_GROUP: tl.constexpr = GW // KW
        m, n, mmask, nmask = splitk_tile(M, N, BLOCK_M, BLOCK_N)
        pid_k = tl.program_id(1)
        groups = K // S
        first, last = _split_steps(K, pid_k, BLOCK_K, SPLIT_K)
        dtype = x_ptr.dtype.element_ty
        c = tl.arange(0, BLOCK_K)
        k_of_c = 2 * GW * ((c // (2 * TW)) % 4) + 2 * TW * (c // (8 * TW)) + c % (2 * TW)
        x_at = x_ptr + m[None, :] * stride_xm + k_of_c[:, None]  # x^T [BLOCK_K, BLOCK_M]
        # [BLOCK_N, KW]: contiguous rows (the row stride an argument: its divisibility by 16 gives 16-byte loads)
        w_at = qw_ptr + n[:, None] * stride_wn + tl.arange(0, KW)[None, :]
        j = tl.arange(0, 8)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for step in range(first, last):
            group = step // STEPS_A_GROUP  # a step never crosses a group (BLOCK_K divides it)
            col0 = group * S + 2 * KW * (step % STEPS_A_GROUP)  # x column of the step's first word's nibble 0
            words = tl.load(w_at + step * KW, mask=nmask[:, None], other=0)
            scale = tl.load(s_ptr + n * groups + group, mask=nmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(z_ptr + n * groups + group, mask=nmask, other=0.0).to(tl.float32)
            else:
                zero = tl.full([BLOCK_N], 8.0, tl.float32)
            codes = (words[:, :, None] >> (4 * j)[None, None, :]) & 0xF  # [BLOCK_N, KW, 8]: word w, nibble j
            codes = tl.reshape(tl.permute(tl.reshape(codes, [BLOCK_N, KW // TW, TW, 4, 2]), (0, 1, 3, 2, 4)),
                               [BLOCK_N, BLOCK_K])  # -> [n, q, p, t, e]
            xt = tl.load(x_at + col0, mask=mmask[None, :], other=0.0)
            if SCALE_CODES:  # (c - z) s a weight, one accumulator chained through the products
                cf = (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + c, minus 2^23
                a = (cf * scale[:, None] - (zero * scale)[:, None]).to(dtype)
                acc = _product(a, xt, acc, DOT_F32)
            else:  # magic + c a weight; scale and zero point once a group and channel, after the product
                part = _product(_magic16(codes, MAGIC_BITS, dtype), xt, tl.zeros([BLOCK_N, BLOCK_M], tl.float32),
                                DOT_F32)
                xsum = tl.sum(xt.to(tl.float32), axis=0)
                acc += (part - (MAGIC + zero)[:, None] * xsum[None, :]) * scale[:, None]
        splitk_finish(tl.trans(acc), b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, tl.program_id(0),
                      pid_k, HAS_BIAS, SPLIT_K)


def kmajor_gemm_block_k(config: KMajorGemmConfig, group_size: int) -> int:
    """The K step a launch uses: the config's, capped at the group size (a step never crosses a group)."""
    block_k = min(config.block_k, group_size)
    if group_size % block_k or block_k < 16:
        raise ValueError(f"the K-major W4 GEMM needs a group size that is a multiple of 16; got {group_size}")
    if not config.one_dot and block_k < 128:
        raise ValueError(f"one_dot=False needs group size >= 128 (16 words a nibble product); got {group_size}")
    return block_k


def w4_kmajor_gemm(x: torch.Tensor, weight: KMajorWeight, config: KMajorGemmConfig | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, any M) times the dequantized K-major 4-bit weight (+ bias) -> [M, N] in x's dtype."""
    if not isinstance(weight, KMajorWeight):
        raise ValueError("w4_kmajor_gemm takes a KMajorWeight (kernels/w4_gemv.py: repack_k_major)")
    config = config or KMajorGemmConfig()
    x = checked_input(x, weight, "w4_kmajor_gemm")
    m, k = x.shape
    n = weight.out_features
    if config.pipelined:  # natural K order: a step is a quarter to all of a group
        block_k = ring_block_k(config.block_k, weight.group_size)
        if config.weight_ring and weight.group_size > 128:
            raise ValueError(f"weight_ring=True serves groups of 32-128 (a row's group of words one ring copy); got "
                             f"{weight.group_size}")
    else:
        block_k = kmajor_gemm_block_k(config, weight.group_size)
    out = x.new_empty((m, n))
    if m == 0:
        return out
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    split_k = fit_split_k(config.split_k, m, n, tiles, k // block_k)
    work = splitk_workspace(x.device)
    magic_bits, magic = (0x4300, 128.0) if x.dtype == torch.bfloat16 else (0x6400, 1024.0)
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    if config.w_lhs:  # the transposed product: Triton's kernel, or Gluon's with the same arguments
        if config.gluon and not (HAS_GLUON and x.is_cuda):
            raise ValueError("gluon=True needs CUDA and triton's Gluon (Triton's interpreter does not run Gluon)")
        args = (x, weight.qweight, weight.scales, zeros, bias if bias is not None else weight.scales, out,
                work.partials, work.counters, m, n, k, x.stride(0), weight.qweight.stride(0), out.stride(0))
        shared = dict(HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k,
                      BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GW=weight.group_size // 8,
                      num_warps=config.num_warps)
        if config.pipelined:
            _kmajor_gemm_gluon_ring_kernel[(tiles, split_k)](*args, **shared, STAGES=config.num_stages,
                                                            WARPS=config.num_warps, W_RING=config.weight_ring,
                                                            PACKED=config.pair_dequant and weight.integer_zeros,
                                                            A_REGS=config.register_a,
                                                            FINISH_ROWS=config.finish_rows if split_k > 1 else 0)
            return out
        shared.update(TW=min(4, block_k // 8), MAGIC_BITS=magic_bits, MAGIC=magic)
        if config.gluon:
            _kmajor_gemm_gluon_kernel[(tiles, split_k)](*args, **shared, WARPS=config.num_warps)
        else:
            _kmajor_gemm_lhs_kernel[(tiles, split_k)](*args, **shared, SCALE_CODES=config.scale_codes,
                                                      DOT_F32=dot_in_fp32(x.dtype), num_stages=config.num_stages)
        return out
    _kmajor_gemm_kernel[(tiles, split_k)](
        x, weight.qweight, weight.scales, zeros, bias if bias is not None else weight.scales, out,
        work.partials, work.counters, m, n, k, x.stride(0), out.stride(0),
        HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=block_k, GW=weight.group_size // 8, MAGIC_BITS=magic_bits, MAGIC=magic,
        ONE_DOT=config.one_dot, X_RUNS=config.x_runs, SCALE_CODES=config.scale_codes, DOT_F32=dot_in_fp32(x.dtype), num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
