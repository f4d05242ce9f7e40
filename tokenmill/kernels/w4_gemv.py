"""W4A16 GEMV variants for 1-16 rows (issue 20's batch-1 decode target), beside the split-K kernel that serves
today (kernels/wna16_splitk.py); benchmarks/gpu_w4_gemv_probe.py times them against it and cuBLAS bf16.

That kernel spends ~6 instructions a weight (shift, and-or, bitcast, subtract, FMA) and streams small tiles one
K step at a time, so at one row it is bound by issue and by round trips, not by bandwidth. Each variant here
cuts one of those:

- ``kmajor`` (fp32 FMAs, 1-8 rows): a one-time repack (``repack_k_major``) puts each output channel's words
  contiguous along K, so a program loads a few channels' whole K range (or large chunks of it) in one wide load and
  reduces along K inside the program: no split-K, no workspace, one launch. Each code becomes ``1 + code / 16`` in
  fp32 with one shift and one and-or (the nibble moved into the top of the mantissa of 1.0), the FMA multiplies it
  by x, and the group's scale and zero point are applied once a word: sum_k x (c - z) s = s (16 p - (16 + z) xs)
  with p = sum_k x (1 + c / 16) and xs = sum_k x.
- ``nmajor``: the same arithmetic on the GPTQ layout as loaded (words contiguous along N), split over K, the
  splits reduced in the same launch (kernels/splitk.py's workspace and counter) or by fp32 atomics into a zeroed
  buffer (plus the memset and the cast: three launches).
- ``mma`` (tensor cores, 1-16 rows padded to 16): codes become bf16 (or fp16) ``magic + code`` with a shift, an
  and-or and a truncation (``0x4300 | code`` is bf16 128 + code, ``0x6400 | code`` fp16 1024 + code), one
  ``tl.dot`` per nibble position against x's matching columns (K order inside a word does not matter to a sum);
  scale and zero point once a group: s (part - (magic + z) xs). ``asm=True`` builds two codes a word at once
  with PTX ``lop3`` on a pair of 16-bit lanes (GPU only: Triton's interpreter cannot run inline PTX).

Every variant keeps fp32 accumulation; the tests compare each with the fp32 product of x and the dequantized
weight (tests/kernels/test_w4_gemv.py). None is wired into kernels/quant_dispatch.py yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, tl, triton
from tokenmill.kernels.splitk import COUNTERS, PARTIAL_ELEMENTS, dot_in_fp32, splitk_workspace
from tokenmill.kernels.wna16_gemm import PackedWeight, checked_input

GEMV_KINDS = ("kmajor", "nmajor", "mma")
REDUCE_MODES = ("finish", "atomic")
MAX_ROWS = 16
FMA_MAX_ROWS = 8  # the FMA kinds multiply every row on the CUDA cores: past 8 rows the tensor cores win


@dataclass(frozen=True)
class KMajorWeight:
    """A 4-bit PackedWeight transposed once at load: words contiguous along K for each output channel."""

    qweight: torch.Tensor  # int32 [N, K / 8], nibble j of word w is input channel 8 w + j
    scales: torch.Tensor  # [N, groups]
    zeros: torch.Tensor | None  # [N, groups] float zero points, or None (symmetric: 8)
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    bits = 4  # checked_input's and the probe's view of it


def repack_k_major(packed: PackedWeight) -> KMajorWeight:
    """The K-major copy of a 4-bit ``packed`` (a one-time load step; the nibble order inside a word is kept)."""
    if packed.bits != 4:
        raise ValueError(f"the K-major W4 GEMV takes 4-bit weights; got {packed.bits}-bit")
    zeros = None if packed.zeros is None else packed.zeros.t().contiguous()
    return KMajorWeight(packed.qweight.t().contiguous(), packed.scales.t().contiguous(), zeros, packed.group_size)


@dataclass(frozen=True)
class W4GemvConfig:
    """One variant's tiles (see the module docstring for ``kind``).

    ``groups``: quantization groups of K a program covers per step: ``kmajor`` loops over K in chunks of that
    many groups (0: all of K in one chunk); ``nmajor`` and ``mma`` split K into programs of that many groups
    (``mma`` loops over them one group at a time). ``reduce`` is how K splits meet; ``asm`` only for ``mma``.
    """

    kind: str = "kmajor"
    block_n: int = 4
    groups: int = 0
    reduce: str = "finish"
    asm: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.kind not in GEMV_KINDS:
            raise ValueError(f"W4 GEMV kind {self.kind!r} is not one of {GEMV_KINDS}")
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"W4 GEMV reduce {self.reduce!r} is not one of {REDUCE_MODES}")
        if self.block_n < 1 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two; got {self.block_n}")
        if self.groups < 0 or (self.groups and self.groups & (self.groups - 1)):
            raise ValueError(f"groups must be 0 or a power of two; got {self.groups}")
        if self.kind != "kmajor" and self.groups == 0:
            raise ValueError(f"the {self.kind!r} kind needs groups >= 1 (groups of K per program)")
        if self.asm and self.kind != "mma":
            raise ValueError("asm=True is a variant of the 'mma' kind only")

    @property
    def name(self) -> str:
        tail = f"_{self.reduce}" if self.kind != "kmajor" else ""
        return (f"{self.kind}{'_asm' if self.asm else ''}_n{self.block_n}_g{self.groups}{tail}"
                f"_w{self.num_warps}_st{self.num_stages}")


if HAS_TRITON:
    from tokenmill.kernels.splitk import splitk_finish

    @triton.jit
    def _unit_code(words, J: tl.constexpr):
        """Nibble J of every word as fp32 1 + code / 16: the nibble shifted to bits 19-22 (the mantissa's top)
        and or-ed into 1.0's bits; no int-to-float conversion, no subtraction."""
        if J * 4 <= 19:
            moved = words << (19 - J * 4)
        else:
            moved = words >> (J * 4 - 19)  # arithmetic shift: the sign bits land above the mask
        return ((moved & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _group_terms(s_ptr, z_ptr, offsets, mask, HAS_ZEROS: tl.constexpr):
        """(16 s, -(16 + z) s) of the groups at ``offsets``: a word's contribution is 16 s p - (16 + z) s xs."""
        s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            z = tl.full(s.shape, 8.0, tl.float32)
        return 16.0 * s, -(16.0 + z) * s

    @triton.jit(do_not_specialize=["M"])
    def _kmajor_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, G, stride_xm, stride_om,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK_G: tl.constexpr, GW: tl.constexpr,
    ):
        """Program: BLOCK_N output channels over all of K, CHUNK_G groups of GW words a load ([rows, n, g, w])."""
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, ROWS)
        mmask = m < M
        gi = tl.arange(0, CHUNK_G)
        wi = tl.arange(0, GW)
        kw = G * GW  # words per output channel
        acc = tl.zeros([ROWS, BLOCK_N, CHUNK_G, GW], tl.float32)
        for g0 in range(0, G, CHUNK_G):
            g = g0 + gi
            gmask = g < G
            word = g[:, None] * GW + wi[None, :]  # [g, w]
            words = tl.load(qw_ptr + n[:, None, None] * kw + word[None, :, :],
                            mask=nmask[:, None, None] & gmask[None, :, None], other=0)
            a, b = _group_terms(s_ptr, z_ptr, n[:, None] * G + g[None, :], nmask[:, None] & gmask[None, :],
                                HAS_ZEROS)
            x_at = x_ptr + m[:, None, None, None] * stride_xm + (word * 8)[None, None, :, :]
            xmask = mmask[:, None, None, None] & gmask[None, None, :, None]
            p = tl.zeros([ROWS, BLOCK_N, CHUNK_G, GW], tl.float32)
            xs = tl.zeros([ROWS, 1, CHUNK_G, GW], tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_at + j, mask=xmask, other=0.0).to(tl.float32)
                p += _unit_code(words, j)[None, :, :, :] * xj
                xs += xj
            acc += a[None, :, :, None] * p + b[None, :, :, None] * xs
        out = tl.sum(tl.sum(acc, axis=3), axis=2)
        if HAS_BIAS:
            out += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * stride_om + n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _reduce_store(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, tile, pid_k,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr):
        """acc [ROWS, BLOCK_N] fp32 of one K split: fp32 atomic adds into the zeroed buffer ``out_ptr``
        (bias from split 0), or kernels/splitk.py's workspace and counter (one launch, split order)."""
        if ATOMIC:
            if HAS_BIAS:
                if pid_k == 0:
                    acc += tl.load(b_ptr + n, mask=n < N, other=0.0).to(tl.float32)[None, :]
            tl.atomic_add(out_ptr + m[:, None] * stride_om + n[None, :], acc,
                          mask=(m < M)[:, None] & (n < N)[None, :], sem="relaxed")
        else:
            splitk_finish(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, tile, pid_k, HAS_BIAS,
                          SPLIT_K)

    @triton.jit(do_not_specialize=["M"])
    def _nmajor_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, G, stride_xm, stride_om,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLIT_G: tl.constexpr, GW: tl.constexpr, SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        """Program (n tile, K split): SPLIT_G groups x BLOCK_N channels of the GPTQ layout in one load
        ([rows, g, w, n])."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, ROWS)
        mmask = m < M
        g = pid_k * SPLIT_G + tl.arange(0, SPLIT_G)
        gmask = g < G
        word = g[:, None] * GW + tl.arange(0, GW)[None, :]  # [g, w]
        words = tl.load(qw_ptr + word[:, :, None] * N + n[None, None, :],
                        mask=gmask[:, None, None] & nmask[None, None, :], other=0)
        a, b = _group_terms(s_ptr, z_ptr, g[:, None] * N + n[None, :], gmask[:, None] & nmask[None, :], HAS_ZEROS)
        x_at = x_ptr + m[:, None, None, None] * stride_xm + (word * 8)[None, :, :, None]
        xmask = mmask[:, None, None, None] & gmask[None, :, None, None]
        p = tl.zeros([ROWS, SPLIT_G, GW, BLOCK_N], tl.float32)
        xs = tl.zeros([ROWS, SPLIT_G, GW, 1], tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_at + j, mask=xmask, other=0.0).to(tl.float32)
            p += _unit_code(words, j)[None, :, :, :] * xj
            xs += xj
        acc = tl.sum(tl.sum(a[None, :, None, :] * p + b[None, :, None, :] * xs, axis=2), axis=1)
        _reduce_store(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, pid_n, pid_k, HAS_BIAS,
                      SPLIT_K, ATOMIC)

    @triton.jit
    def _magic_code(words, J: tl.constexpr, MAGIC_BITS: tl.constexpr, dtype: tl.constexpr):
        """Nibble J of every word as a 16-bit float magic + code (bf16 0x4300: 128; fp16 0x6400: 1024)."""
        bits = ((words >> (J * 4)) & 0xF) | MAGIC_BITS
        return bits.to(tl.int16).to(dtype, bitcast=True)

    @triton.jit
    def _magic_pair_asm(words, J: tl.constexpr, MAGIC_BITS: tl.constexpr, dtype: tl.constexpr):
        """Nibbles J and J + 4 of every word at once: one shift, then one lop3 ((w & 0x000F000F) | magic on both
        16-bit halves) whose halves are read as two 16-bit floats."""
        shifted = words >> (J * 4)  # the mask drops the sign bits an arithmetic shift brings in
        if MAGIC_BITS == 0x4300:
            pair = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x43004300, 0xea; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [shifted], dtype=(dtype, dtype), is_pure=True, pack=1)
        else:
            pair = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000F000F, 0x64006400, 0xea; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [shifted], dtype=(dtype, dtype), is_pure=True, pack=1)
        return pair

    @triton.jit
    def _mma_step(part, x_at, xmask, c, J: tl.constexpr, DOT_F32: tl.constexpr):
        """part += x's columns 8 w + J (rows padded to 16) times the codes c [w, n]; also returns those x."""
        xj = tl.load(x_at + J, mask=xmask, other=0.0)
        if DOT_F32:  # the interpreter multiplies bf16's raw storage (kernels/splitk.py: dot_in_fp32)
            part = tl.dot(xj.to(tl.float32), c.to(tl.float32), part, input_precision="ieee")
        else:
            part = tl.dot(xj, c, part)
        return part, xj.to(tl.float32)

    @triton.jit(do_not_specialize=["M"])
    def _mma_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, G, stride_xm, stride_om,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_G: tl.constexpr,
        GW: tl.constexpr, SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr, MAGIC_BITS: tl.constexpr,
        MAGIC: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """Program (n tile, K split): SPLIT_G groups one at a time, eight 16 x GW x BLOCK_N products a group."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        m = tl.arange(0, 16)
        mmask = m < M
        wi = tl.arange(0, GW)
        dtype = x_ptr.dtype.element_ty
        acc = tl.zeros([16, BLOCK_N], tl.float32)
        first = pid_k * SPLIT_G
        for g in range(first, tl.minimum(first + SPLIT_G, G)):
            word = g * GW + wi
            words = tl.load(qw_ptr + word[:, None] * N + n[None, :], mask=nmask[None, :], other=0)
            x_at = x_ptr + m[:, None] * stride_xm + (word * 8)[None, :]
            xmask = mmask[:, None]
            part = tl.zeros([16, BLOCK_N], tl.float32)
            xs = tl.zeros([16, GW], tl.float32)
            for j in tl.static_range(4):
                if ASM:
                    lo, hi = _magic_pair_asm(words, j, MAGIC_BITS, dtype)
                else:
                    lo = _magic_code(words, j, MAGIC_BITS, dtype)
                    hi = _magic_code(words, j + 4, MAGIC_BITS, dtype)
                part, x_lo = _mma_step(part, x_at, xmask, lo, j, DOT_F32)
                part, x_hi = _mma_step(part, x_at, xmask, hi, j + 4, DOT_F32)
                xs += x_lo + x_hi
            s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            acc += part * s[None, :] - tl.sum(xs, axis=1)[:, None] * ((MAGIC + z) * s)[None, :]
        _reduce_store(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, pid_n, pid_k, HAS_BIAS,
                      SPLIT_K, ATOMIC)


def _group_words(group_size: int, kind: str) -> int:
    """Words per group (a power of two, >= 16 for the tensor-core kind's K of 16), or a ValueError."""
    gw = group_size // 8
    if group_size % 8 or gw & (gw - 1):
        raise ValueError(f"the W4 GEMV needs a group size of 8 x a power of two; got {group_size}")
    if kind == "mma" and gw < 16:
        raise ValueError(f"the 'mma' W4 GEMV needs group size >= 128 (tl.dot's K of 16 words); got {group_size}")
    return gw


def split_plan(config: W4GemvConfig, rows: int, n: int, groups: int) -> tuple[int, int]:
    """(groups of K per program, K splits) of an ``nmajor`` / ``mma`` launch over ``rows`` x ``n`` outputs: the
    config's, raised until the finish workspace holds every partial."""
    per_split = min(config.groups, next_power_of_2(groups))
    split = -(-groups // per_split)
    if config.reduce == "finish":
        while split > 1 and split * rows * n > PARTIAL_ELEMENTS:
            per_split *= 2
            split = -(-groups // per_split)
    return per_split, split


def w4_gemv(x: torch.Tensor, weight: PackedWeight | KMajorWeight, config: W4GemvConfig,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M <= 16) times the dequantized 4-bit weight (+ bias) -> [M, N] in x's dtype;
    ``kmajor`` takes ``repack_k_major``'s weight, the other kinds the PackedWeight as loaded."""
    if (config.kind == "kmajor") != isinstance(weight, KMajorWeight):
        raise ValueError(f"the {config.kind!r} W4 GEMV takes a "
                         f"{'KMajorWeight (repack_k_major)' if config.kind == 'kmajor' else 'PackedWeight'}")
    if weight.bits != 4:
        raise ValueError(f"the W4 GEMV takes 4-bit weights; got {weight.bits}-bit")
    x = checked_input(x, weight, "w4_gemv")
    m, k = x.shape
    n = weight.out_features
    max_rows = FMA_MAX_ROWS if config.kind != "mma" else MAX_ROWS
    if m > max_rows:
        raise ValueError(f"the {config.kind!r} W4 GEMV takes at most {max_rows} rows; got {m}")
    gw = _group_words(weight.group_size, config.kind)
    groups = k // weight.group_size
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    bias_arg = bias if bias is not None else weight.scales
    common = dict(HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=config.block_n, GW=gw,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kind == "kmajor":
        out = x.new_empty((m, n))
        if m:
            chunk = next_power_of_2(groups) if config.groups == 0 else min(config.groups, next_power_of_2(groups))
            _kmajor_kernel[(triton.cdiv(n, config.block_n),)](
                x, weight.qweight, weight.scales, zeros, bias_arg, out, m, n, groups, x.stride(0), out.stride(0),
                ROWS=max(1, next_power_of_2(m)), CHUNK_G=chunk, **common)
        return out
    per_split, split = split_plan(config, m, n, groups)
    tiles = triton.cdiv(n, config.block_n)
    atomic = config.reduce == "atomic" and split > 1
    if not atomic and split > 1 and tiles > COUNTERS:
        raise ValueError(f"{tiles} output tiles exceed the split-K counters ({COUNTERS}); raise block_n")
    out = torch.zeros((m, n), dtype=torch.float32, device=x.device) if atomic else x.new_empty((m, n))
    if m == 0:
        return out.to(x.dtype)
    work = splitk_workspace(x.device)
    args = (x, weight.qweight, weight.scales, zeros, bias_arg, out, work.partials, work.counters, m, n, groups,
            x.stride(0), out.stride(0))
    if config.kind == "nmajor":
        _nmajor_kernel[(tiles, split)](*args, ROWS=max(1, next_power_of_2(m)), SPLIT_G=per_split, SPLIT_K=split,
                                       ATOMIC=atomic, **common)
    else:
        magic_bits, magic = (0x4300, 128.0) if x.dtype == torch.bfloat16 else (0x6400, 1024.0)
        _mma_kernel[(tiles, split)](*args, SPLIT_G=per_split, SPLIT_K=split, ATOMIC=atomic, MAGIC_BITS=magic_bits,
                                    MAGIC=magic, ASM=config.asm, DOT_F32=dot_in_fp32(x.dtype), **common)
    return out.to(x.dtype) if atomic else out
