"""W4A16 GEMV variants for 1-16 rows (issue 20's batch-1 decode target), beside the split-K kernel that serves
today (kernels/wna16_splitk.py); benchmarks/gpu_w4_gemv_probe.py times them against it and cuBLAS bf16.

That kernel spends ~6 instructions a weight (shift, and-or, bitcast, subtract, FMA), shuffles tiles through
shared memory and streams small tiles one K step at a time, so at one row it is bound by issue and round trips,
not by bandwidth. The variants (instruction counts from sm_90 SASS of the K loop, compiled without a GPU by
triton 3.6 and 3.9):

- ``kmajor`` (fp32 FMAs, 1-8 rows; 3.5-3.9 instructions a weight at 1 row, 2.8-4.3 a row-weight at 2-8): a one-time
  repack (``repack_k_major``) puts each output channel's words contiguous along K, interleaved so that each
  word's x values are int32 pairs of x loaded in the words' own tile shape (no layout shuffle). A program loads a
  few channels' whole K range (or large chunks) at once and reduces along K itself: no split-K, one launch. A
  nibble becomes fp32 ``base + code / 16`` by one and-or into the mantissa of 128 or 8 (half a shift a weight),
  the FMA multiplies it by x, and per group sum x (c - z) s = s (16 (p - xb) - z xs), xb = sum x base.
- ``nmajor``: FMAs on the GPTQ layout as loaded (words contiguous along N), split over K, the splits reduced in
  the same launch (kernels/splitk.py's workspace and counter) or by fp32 atomics into a zeroed buffer (plus the
  memset and the cast: three launches). A reference point: its tiles spill.
- ``mma`` / ``mma_k`` (tensor cores, 1-16 rows padded to 16): codes become bf16 (fp16) ``magic + code`` with a
  shift, an and-or and a truncation (``0x4300 | code`` is bf16 128 + code, ``0x6400 | code`` fp16 1024 + code);
  ``mma`` does one ``tl.dot`` per nibble position against x's matching columns (K order inside a word does not
  matter to a sum), ``mma_k`` stacks the eight code tiles into one product a group with x gathered in that order
  (one operand shuffle through shared memory instead of eight). Scale and zero point once a group:
  s (part - (magic + z) xs). ``asm=True`` builds the codes of two neighbouring words with PTX (one ``lop3`` a
  word on both 16-bit halves, two ``prmt``): GPU only, Triton's interpreter cannot run inline PTX.

Every variant keeps fp32 accumulation; tests/kernels/test_w4_gemv.py compares each with the fp32 product of x and
the dequantized weight. ``kmajor`` serves 1-4 rows of weights kept in the K-major layout
(``--quant-weight-layout kmajor``: kernels/quant_dispatch.py's ``kmajor_cuda_linear``); past its rows,
kernels/w4_kmajor_gemm.py multiplies on the tensor cores from the same K-major repack. The other kinds are table
entries for the GPTQ layout (none shipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, pdl_launch, pdl_wait, tl, triton
from tokenmill.kernels.gemv_epilogue import (
    EpilogueNorm,
    PrologueRms,
    check_act_mul,
    next_norm_launch,
    residual_launch,
    rms_launch,
)
from tokenmill.kernels.splitk import COUNTERS, PARTIAL_ELEMENTS, dot_in_fp32, splitk_workspace
from tokenmill.kernels.wna16_gemm import PackedWeight, checked_input, unpack_codes
from tokenmill.quantization.packing import pack_along, unpack_along

GEMV_KINDS = ("kmajor", "nmajor", "mma", "mma_k")
REDUCE_MODES = ("finish", "atomic")
MAX_ROWS = 16
FMA_MAX_ROWS = 8  # the FMA kinds multiply every row on the CUDA cores: past 8 rows the tensor cores win
MAX_PRELOAD_STEPS = 8  # chunks a kmajor program requests before its PDL wait (one in registers, the rest L2)


@dataclass(frozen=True)
class KMajorWeight:
    """A 4-bit PackedWeight repacked once at load for the ``kmajor`` kind: each output channel's words contiguous
    along K, and inside a group of S = 8 GW input channels, word w holds channels S g + 2 GW t + 2 w + e as nibble
    2 t + e (t < 4, e < 2). So for every t the words' x values are the bf16 pairs at int32 index 4 GW g + GW t + w
    of x: one contiguous load the same shape as the words' (no layout shuffle between them in the kernel)."""

    qweight: torch.Tensor  # int32 [N, K / 8]
    scales: torch.Tensor  # [N, groups]
    zeros: torch.Tensor | None  # [N, groups] float zero points, or None (symmetric: 8)
    group_size: int
    integer_zeros: bool = False  # every zero point a small integer (exact in bf16 next to the codes' 128 + c)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    bits = 4  # checked_input's and the probe's view of it


def _pair_order(n: int, k: int, group_size: int) -> tuple[int, ...]:
    """The [n, groups, t, w, e] -> [n, groups, w, t, e] view that turns K order into the repacked nibble order."""
    return (n, k // group_size, 4, group_size // 8, 2)


def repack_k_major(packed: PackedWeight) -> KMajorWeight:
    """The ``kmajor`` kind's copy of a 4-bit ``packed`` (a one-time load step; see KMajorWeight)."""
    if packed.bits != 4:
        raise ValueError(f"the K-major W4 GEMV takes 4-bit weights; got {packed.bits}-bit")
    return k_major_from_codes(unpack_codes(packed.qweight, 4), packed.scales, packed.zeros, packed.group_size)


def k_major_from_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       group_size: int) -> KMajorWeight:
    """The K-major weight of 4-bit ``codes`` [K, N] (int, 0-15) with ``scales`` / ``zeros`` [groups, N] (the
    linear methods' repack at load, without packing along K first)."""
    _group_words(group_size, "kmajor")
    k, n = codes.shape
    codes = codes.t().reshape(_pair_order(n, k, group_size))
    words = pack_along(codes.permute(0, 1, 3, 2, 4).reshape(n, k), 4, dim=1)
    zeros = None if zeros is None else zeros.t().contiguous()
    return KMajorWeight(words, scales.t().contiguous(), zeros, group_size, integer_zero_points(zeros))


def integer_zero_points(zeros: torch.Tensor | None) -> bool:
    """Whether every zero point is an integer in [-64, 64] (None: symmetric, 8): GPTQ / AWQ / RTN ones are, GGUF
    Q4_1's (-min / scale) are not. A one-time check at load (it reads the tensor)."""
    if zeros is None:
        return True
    z = zeros.float()
    return bool(torch.equal(z, z.round()) and z.abs().max().item() <= 64) if z.numel() else True


def dequantize_k_major(weight: KMajorWeight) -> torch.Tensor:
    """W^T [K, N] in fp32 from the repacked layout (the tests' check of the repack)."""
    n, k = weight.out_features, weight.in_features
    shape = _pair_order(n, k, weight.group_size)
    codes = unpack_along(weight.qweight, 4, dim=1).reshape(n, shape[1], shape[3], 4, 2).permute(0, 1, 3, 2, 4)
    codes = codes.reshape(n, k).float()
    scales = weight.scales.float().repeat_interleave(weight.group_size, dim=1)
    zeros = 8.0 if weight.zeros is None else weight.zeros.float().repeat_interleave(weight.group_size, dim=1)
    return ((codes - zeros) * scales).t()


@dataclass(frozen=True)
class PrologueNorm:
    """The RMSNorm a ``kmajor`` GEMV applies to its input (``w4_gemv``'s ``norm``): norm(x) * weight, x being the
    residual stream (a producer GEMV's ``residual`` epilogue made the sum)."""

    weight: torch.Tensor  # [K], x's dtype
    eps: float


@dataclass(frozen=True)
class W4GemvConfig:
    """One variant's tiles (see the module docstring for ``kind``).

    ``groups``: quantization groups of K a program covers per step: ``kmajor`` loops over K in chunks of that
    many groups (0: all of K in one chunk; ``prefetch`` keeps the next chunk's load in flight); ``nmajor`` and
    the ``mma`` kinds split K into programs of that many groups (``mma`` kinds loop over them one group at a
    time). ``reduce`` is how K splits meet; ``asm`` only for the ``mma`` kinds.

    ``pdl`` (``kmajor`` only): launched with programmatic dependent launch where kernels/_triton.py's
    ``pdl_launch`` allows (Hopper, <= 64 rows), like the engine's other decode kernels. ``preload_steps``
    (``kmajor`` only): chunks of weights requested first thing, before the wait for the previous kernel (its x)
    under PDL: the first into registers, the next ``preload_steps - 1`` as L2 prefetches (without PDL the
    prefetches alone still put a program's later chunks in flight at its start). Defaults: neither (as before).
    """

    kind: str = "kmajor"
    block_n: int = 4
    groups: int = 0
    reduce: str = "finish"
    asm: bool = False
    num_warps: int = 4
    num_stages: int = 2
    prefetch: bool = False
    pdl: bool = False
    preload_steps: int = 0

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
        if self.prefetch and self.kind != "kmajor":
            raise ValueError("prefetch=True is a variant of the 'kmajor' kind only")
        if self.pdl and self.kind != "kmajor":
            raise ValueError("pdl=True is a variant of the 'kmajor' kind only")
        if not 0 <= self.preload_steps <= MAX_PRELOAD_STEPS or (self.preload_steps and self.kind != "kmajor"):
            raise ValueError(f"preload_steps must be 0-{MAX_PRELOAD_STEPS}, and above 0 only for the 'kmajor' kind; "
                             f"got {self.preload_steps} ({self.kind!r})")
        if self.asm and not self.kind.startswith("mma"):
            raise ValueError("asm=True is a variant of the tensor-core kinds ('mma', 'mma_k') only")

    @property
    def name(self) -> str:
        tail = f"_{self.reduce}" if self.kind != "kmajor" else ""
        return (f"{self.kind}{'_asm' if self.asm else ''}_n{self.block_n}_g{self.groups}{tail}"
                f"_w{self.num_warps}_st{self.num_stages}{'_pf' if self.prefetch else ''}"
                f"{'_pdl' if self.pdl else ''}{f'_pre{self.preload_steps}' if self.preload_steps else ''}")


if HAS_TRITON:
    from tokenmill.kernels.gemv_epilogue import gemv_channels, rms_scaled, store_gemv_out
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

    @triton.jit
    def _pair_halves(pairs, X_BF16: tl.constexpr):
        """int32 words of two 16-bit activations -> (low, high) in fp32; bf16 by a shift or a mask alone."""
        if X_BF16:
            return (pairs << 16).to(tl.float32, bitcast=True), (pairs & -65536).to(tl.float32, bitcast=True)
        low = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        high = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return low, high

    @triton.jit
    def _sixteenth_code(words, J: tl.constexpr, M128, M8):
        """Nibble J of every word as fp32 base + code / 16 (base 128 for nibbles 0, 2, 3, 5; 8 for 1, 4, 6, 7):
        the nibble is or-ed, where it sits after a shift shared by two nibbles (or none), into the mantissa of
        the float whose exponent makes its lowest bit 1/16 (bits 12-15 under 2^7, bits 16-19 under 2^3). About
        half a shift and one and-or a weight, no conversion instruction. M128 / M8 are those floats' bits
        (0x43000000, 0x41000000) passed as kernel arguments: as literals the compiler emits the and and the or
        as two instructions (an and-or instruction takes one immediate), as registers it fuses them."""
        if J == 0:
            bits = (words << 12) & 0x0000F000 | M128
        elif J == 1:
            bits = (words << 12) & 0x000F0000 | M8
        elif J == 2:
            bits = (words << 4) & 0x0000F000 | M128
        elif J == 3:
            bits = words & 0x0000F000 | M128
        elif J == 4:
            bits = words & 0x000F0000 | M8
        elif J == 5:
            bits = (words >> 8) & 0x0000F000 | M128
        elif J == 6:
            bits = (words >> 8) & 0x000F0000 | M8
        else:  # the arithmetic shift's sign bits land above the mask
            bits = (words >> 12) & 0x000F0000 | M8
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _chunk_words(qw_ptr, n3, kc3, g0, N, kw, GW: tl.constexpr, EVEN: tl.constexpr):
        """The words of the chunk that starts at group ``g0`` ([1, n, words]; past K or N: 0)."""
        at = qw_ptr + n3 * kw + g0 * GW + kc3
        if EVEN:  # whole tiles: no masks (a predicated load costs a zeroing move a register)
            return tl.load(at)
        return tl.load(at, mask=(n3 < N) & (g0 * GW + kc3 < kw), other=0)

    @triton.jit
    def _chunk_scales(s_ptr, z_ptr, n3, g0, N, G, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
                      CHUNK_G: tl.constexpr, EVEN: tl.constexpr):
        """(scale, zero point) in fp32 of the chunk's groups ([1, n, groups]; symmetric: zero 8)."""
        g3 = g0 + tl.arange(0, CHUNK_G)[None, None, :]
        sz_at = n3 * G + g3
        if EVEN:
            scale = tl.load(s_ptr + sz_at).to(tl.float32)
            zero = tl.load(z_ptr + sz_at).to(tl.float32) if HAS_ZEROS else tl.full(scale.shape, 8.0, tl.float32)
        else:
            mask = (n3 < N) & (g3 < G)
            scale = tl.load(s_ptr + sz_at, mask=mask, other=0.0).to(tl.float32)
            zero = (tl.load(z_ptr + sz_at, mask=mask, other=0.0).to(tl.float32) if HAS_ZEROS
                    else tl.full(scale.shape, 8.0, tl.float32))
        return scale, zero

    @triton.jit
    def _l2_prefetch(ptrs):
        """Asks L2 for the lines at ``ptrs`` (no registers, nothing waits on it): a warp's prefetch of addresses
        in one 128-byte line is one request. GPU only (inline PTX)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def _chunk_pairs(at, mask, GW: tl.constexpr, X_BF16: tl.constexpr, EVEN: tl.constexpr):
        """The eight fp32 values a word position meets: pairs at ``at`` + t GW (t < 4), low half first."""
        if EVEN:
            pair0 = tl.load(at)
            pair1 = tl.load(at + GW)
            pair2 = tl.load(at + 2 * GW)
            pair3 = tl.load(at + 3 * GW)
        else:
            pair0 = tl.load(at, mask=mask, other=0)
            pair1 = tl.load(at + GW, mask=mask, other=0)
            pair2 = tl.load(at + 2 * GW, mask=mask, other=0)
            pair3 = tl.load(at + 3 * GW, mask=mask, other=0)
        x0, x1 = _pair_halves(pair0, X_BF16)
        x2, x3 = _pair_halves(pair1, X_BF16)
        x4, x5 = _pair_halves(pair2, X_BF16)
        x6, x7 = _pair_halves(pair3, X_BF16)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def _chunk_product(acc, squares, words, scale, zero, xp_ptr, m3, M, stride_xm, g0, pair_of, kc3, kw, m128, m8,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_G: tl.constexpr, GW: tl.constexpr,
                       X_BF16: tl.constexpr, EVEN: tl.constexpr, nw_ptr=None, NORM: tl.constexpr = 0):
        """(acc + the chunk's sum x (c - z) s per group (see _kmajor_kernel), squares + the chunk's x^2 where NORM),
        x loaded here (NORM: x is the norm prologue's input, see _kmajor_kernel)."""
        rows = tl.minimum(m3, M - 1)  # rows past M: copies
        offset = g0 * (4 * GW) + pair_of
        xmask = g0 * GW + kc3 < kw
        x0, x1, x2, x3, x4, x5, x6, x7 = _chunk_pairs(xp_ptr + rows * stride_xm + offset, xmask, GW, X_BF16, EVEN)
        if NORM == 1:  # its squares for 1 / rms, which comes at the end (the product is linear in x); x times the weight
            squares += tl.sum(((x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)) + ((x4 * x4 + x5 * x5) + (x6 * x6 + x7 * x7)),
                              axis=2)
            w0, w1, w2, w3, w4, w5, w6, w7 = _chunk_pairs(nw_ptr + offset, xmask, GW, X_BF16, EVEN)
            x0, x1, x2, x3 = x0 * w0, x1 * w1, x2 * w2, x3 * w3
            x4, x5, x6, x7 = x4 * w4, x5 * w5, x6 * w6, x7 * w7
        xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        # the bases of _sixteenth_code: 128 for nibbles 0, 2, 3, 5; 8 for 1, 4, 6, 7
        xb = 128.0 * ((x0 + x2) + (x3 + x5)) + 8.0 * ((x1 + x4) + (x6 + x7))
        p = _sixteenth_code(words, 0, m128, m8) * x0 - xb  # one FMA a statement
        p += _sixteenth_code(words, 1, m128, m8) * x1
        p += _sixteenth_code(words, 2, m128, m8) * x2
        p += _sixteenth_code(words, 3, m128, m8) * x3
        p += _sixteenth_code(words, 4, m128, m8) * x4
        p += _sixteenth_code(words, 5, m128, m8) * x5
        p += _sixteenth_code(words, 6, m128, m8) * x6
        p += _sixteenth_code(words, 7, m128, m8) * x7
        p_group = tl.sum(tl.reshape(p, [ROWS, BLOCK_N, CHUNK_G, GW]), axis=3)
        xs_group = tl.sum(tl.reshape(xs, [ROWS, 1, CHUNK_G, GW]), axis=3)
        return acc + scale * (16.0 * p_group - zero * xs_group), squares

    @triton.jit(do_not_specialize=["M"])
    def _kmajor_kernel(
        xp_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr,
        M, N, G, stride_xm, stride_om, m128, m8,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
        CHUNK_G: tl.constexpr, GW: tl.constexpr, X_BF16: tl.constexpr, EVEN: tl.constexpr,
        PREFETCH: tl.constexpr, PRELOAD: tl.constexpr = 0, L2_PREFETCH: tl.constexpr = False,
        PDL: tl.constexpr = False, ACT_MUL: tl.constexpr = False, nw_ptr=None, eps=0.0, NORM: tl.constexpr = 0,
        res_ptr=None, stride_resm=0, ADD_RESIDUAL: tl.constexpr = False, sums_ptr=None,
        next_nw_ptr=None, h_ptr=None, stride_hm=0, next_sums_ptr=None, zero_ptr=None, NEXT_NORM: tl.constexpr = False,
    ):
        """Program: BLOCK_N output channels over all of K, CHUNK_G groups of GW words a load. Words and x pairs
        are loaded as [rows or 1, n or 1, g, w] tiles of the same shape along (g, w): one register layout, no
        shuffle. ``xp_ptr`` is x as int32 pairs (``stride_xm`` in pairs). PREFETCH loads the next chunk's words
        before this chunk's arithmetic (two chunks in flight where K takes several).

        PRELOAD >= 1: the weights do not depend on the kernel before, only x does, so the first chunk's words and
        scales are loaded into registers before ``pdl_wait`` and, PRELOAD >= 2 with L2_PREFETCH, the next
        PRELOAD - 1 chunks' lines are asked of L2: a program launched early (PDL) streams its weights while the
        previous kernel finishes, and every program has its later chunks in flight from its start.

        Per word, p = sum x (base + c / 16) - xb with xb = sum x base (p starts at -xb; then one FMA a weight),
        so sum x c = 16 p and the group adds s (16 sum_w p - z xs); p is summed over the group's words at once, so
        no per-word accumulator stays live across chunks (registers: more programs per SM, more loads in flight).

        ACT_MUL: the weight is a fused gate|up projection and the output silu(gate) * up (kernels/gemv_epilogue.py).

        NORM (the RMSNorm before the projection, in its prologue): x is the norm's input. Every program reads
        all of x anyway, so it sums the rows' squares as x streams (no pass of its own: one cost 9 us a layer on
        an H100), multiplies x by the norm weight (``nw_ptr``, pairs) and its outputs by 1 / rms at the end: the
        product is linear in x. Not the unfused norm's roundings (it rounds norm(x) and the weight's product to 16 bits):
        fp32 throughout, within that rounding of it.

        NORM 2 (PrologueRms): x already is the stream times the norm weight (a NEXT_NORM producer's ``h``), and
        the outputs are scaled by 1 / rms from the rows' sums of squares at ``sums_ptr``.

        ADD_RESIDUAL: out is the projection plus the residual stream at ``res_ptr`` (kernels/gemv_epilogue.py), the
        next residual stream, which a NORM consumer then normalizes; NEXT_NORM also makes that consumer's NORM 2
        input (store_gemv_out)."""
        pid = tl.program_id(0)
        KC: tl.constexpr = CHUNK_G * GW  # words a chunk: one flat last dim, so every Triton version lays the
        # words and the x pairs out alike (threads and warps along it; channels and rows in registers)
        n3 = gemv_channels(pid, N, BLOCK_N, ACT_MUL)[None, :, None]
        m3 = tl.arange(0, ROWS)[:, None, None]
        kc3 = tl.arange(0, KC)[None, None, :]
        # word kc of the chunk sits in group kc // GW at word kc % GW; its x pairs at 4 GW group + GW t + word
        pair_of = (kc3 // GW) * (4 * GW) + kc3 % GW
        kw = G * GW  # words per output channel
        acc = tl.zeros([ROWS, BLOCK_N, CHUNK_G], tl.float32)
        squares = tl.zeros([ROWS, 1], tl.float32)  # NORM: x's squares (otherwise unused, compiled away)
        if PRELOAD >= 1:  # before the wait: nothing here was written by the kernel before
            words0 = _chunk_words(qw_ptr, n3, kc3, 0, N, kw, GW, EVEN)
            scale0, zero0 = _chunk_scales(s_ptr, z_ptr, n3, 0, N, G, HAS_ZEROS, BLOCK_N, CHUNK_G, EVEN)
            if L2_PREFETCH:
                n_in = tl.minimum(n3, N - 1)  # clamped, not masked: a prefetch has no mask
                LINE: tl.constexpr = 32 if KC >= 32 else KC  # words of a 128-byte line
                line3 = tl.arange(0, KC // LINE)[None, None, :] * LINE
                for c in tl.static_range(1, PRELOAD):
                    _l2_prefetch(qw_ptr + n_in * kw + tl.minimum(c * KC + line3, kw - 1))
                    gs = c * CHUNK_G + tl.arange(0, CHUNK_G)[None, None, :]
                    _l2_prefetch(s_ptr + n_in * G + tl.minimum(gs, G - 1))
                    if HAS_ZEROS:
                        _l2_prefetch(z_ptr + n_in * G + tl.minimum(gs, G - 1))
        pdl_wait(PDL)
        g_first: tl.constexpr = CHUNK_G if PRELOAD >= 1 else 0
        if PREFETCH:  # issued before the preloaded chunk's arithmetic
            ahead = _chunk_words(qw_ptr, n3, kc3, g_first, N, kw, GW, False)
        if PRELOAD >= 1:
            acc, squares = _chunk_product(acc, squares, words0, scale0, zero0, xp_ptr, m3, M, stride_xm, 0, pair_of,
                                          kc3, kw, m128, m8, ROWS, BLOCK_N, CHUNK_G, GW, X_BF16, EVEN, nw_ptr, NORM)
        for g0 in range(g_first, G, CHUNK_G):
            if PREFETCH:
                words = ahead
                ahead = _chunk_words(qw_ptr, n3, kc3, g0 + CHUNK_G, N, kw, GW, False)
            else:
                words = _chunk_words(qw_ptr, n3, kc3, g0, N, kw, GW, EVEN)
            scale, zero = _chunk_scales(s_ptr, z_ptr, n3, g0, N, G, HAS_ZEROS, BLOCK_N, CHUNK_G, EVEN)
            acc, squares = _chunk_product(acc, squares, words, scale, zero, xp_ptr, m3, M, stride_xm, g0, pair_of,
                                          kc3, kw, m128, m8, ROWS, BLOCK_N, CHUNK_G, GW, X_BF16, EVEN, nw_ptr, NORM)
        out = tl.sum(acc, axis=2)
        if NORM == 1:  # K = 8 G GW
            out = out * (1.0 / tl.sqrt(tl.sum(squares, axis=1) / (8 * G * GW) + eps))[:, None]
        if NORM == 2:
            out = rms_scaled(out, sums_ptr, M, 8 * G * GW, eps, ROWS)
        n2 = gemv_channels(pid, N, BLOCK_N, ACT_MUL)[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
        store_gemv_out(out, out_ptr, pid, M, N, stride_om, n2, ROWS, BLOCK_N, ACT_MUL, res_ptr, stride_resm,
                       ADD_RESIDUAL, next_nw_ptr, h_ptr, stride_hm, next_sums_ptr, zero_ptr, NEXT_NORM)

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
    def _magic_pair_asm(words, J: tl.constexpr, MAGIC_BITS: tl.constexpr):
        """Nibbles J and J + 4 of every word as 16-bit floats magic + code, two neighbouring words (two output
        channels) an instruction group: one lop3 a word ((w & 0x000F000F) | magic on both 16-bit halves: nibble J
        low, J + 4 high) and two prmt that regroup the halves into (J of both words) and (J + 4 of both words),
        the 32-bit pairs the tensor-core operand is built from (element 0 in the low half)."""
        shifted = words >> (J * 4)  # the mask drops the sign bits an arithmetic shift brings in
        if MAGIC_BITS == 0x4300:
            pair = tl.inline_asm_elementwise(
                "{ .reg .b32 a, b; lop3.b32 a, $2, 0x000F000F, 0x43004300, 0xea; "
                "lop3.b32 b, $3, 0x000F000F, 0x43004300, 0xea; prmt.b32 $0, a, b, 0x5410; "
                "prmt.b32 $1, a, b, 0x7632; }",
                "=r,=r,r,r", [shifted], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2)
        else:
            pair = tl.inline_asm_elementwise(
                "{ .reg .b32 a, b; lop3.b32 a, $2, 0x000F000F, 0x64006400, 0xea; "
                "lop3.b32 b, $3, 0x000F000F, 0x64006400, 0xea; prmt.b32 $0, a, b, 0x5410; "
                "prmt.b32 $1, a, b, 0x7632; }",
                "=r,=r,r,r", [shifted], dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
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

    @triton.jit
    def _stack_k(a, b):
        """[R, N] on top of [R, N] -> [2R, N]."""
        joined = tl.permute(tl.join(a, b), (2, 0, 1))
        return tl.reshape(joined, [2 * a.shape[0], a.shape[1]])

    @triton.jit
    def _all_codes(words, MAGIC_BITS: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr):
        """The eight nibbles' magic + code tiles of ``words``."""
        if ASM:
            c0, c4 = _magic_pair_asm(words, 0, MAGIC_BITS)
            c1, c5 = _magic_pair_asm(words, 1, MAGIC_BITS)
            c2, c6 = _magic_pair_asm(words, 2, MAGIC_BITS)
            c3, c7 = _magic_pair_asm(words, 3, MAGIC_BITS)
        else:
            c0 = _magic_code(words, 0, MAGIC_BITS, dtype)
            c1 = _magic_code(words, 1, MAGIC_BITS, dtype)
            c2 = _magic_code(words, 2, MAGIC_BITS, dtype)
            c3 = _magic_code(words, 3, MAGIC_BITS, dtype)
            c4 = _magic_code(words, 4, MAGIC_BITS, dtype)
            c5 = _magic_code(words, 5, MAGIC_BITS, dtype)
            c6 = _magic_code(words, 6, MAGIC_BITS, dtype)
            c7 = _magic_code(words, 7, MAGIC_BITS, dtype)
        return c0, c1, c2, c3, c4, c5, c6, c7

    @triton.jit(do_not_specialize=["M"])
    def _mma_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, G, stride_xm, stride_om,
        HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_G: tl.constexpr,
        GW: tl.constexpr, SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr, MAGIC_BITS: tl.constexpr,
        MAGIC: tl.constexpr, ASM: tl.constexpr, DOT_F32: tl.constexpr, ONE_DOT: tl.constexpr,
    ):
        """Program (n tile, K split): SPLIT_G groups one at a time; a group is eight 16 x GW x BLOCK_N products
        (one a nibble position) or, ONE_DOT, the eight code tiles stacked into one 16 x 8 GW x BLOCK_N product
        (one operand shuffle through shared memory a group instead of eight)."""
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
            xmask = mmask[:, None]
            if ONE_DOT:  # the eight code tiles stacked along K (nibble-major), x gathered in that order
                c0, c1, c2, c3, c4, c5, c6, c7 = _all_codes(words, MAGIC_BITS, dtype, ASM)
                codes = _stack_k(_stack_k(_stack_k(c0, c1), _stack_k(c2, c3)),
                                 _stack_k(_stack_k(c4, c5), _stack_k(c6, c7)))
                v = tl.arange(0, 8 * GW)
                xv = tl.load(x_ptr + m[:, None] * stride_xm + (g * 8 * GW + 8 * (v % GW) + v // GW)[None, :],
                             mask=xmask, other=0.0)
                if DOT_F32:
                    part = tl.dot(xv.to(tl.float32), codes.to(tl.float32), input_precision="ieee")
                else:
                    part = tl.dot(xv, codes)
                # the group's x sum from a contiguous load of the same values: a cheap layout to reduce in
                kc = g * 8 * GW + tl.arange(0, 8 * GW)
                xsum = tl.sum(tl.load(x_ptr + m[:, None] * stride_xm + kc[None, :], mask=xmask, other=0.0)
                              .to(tl.float32), axis=1)
            else:
                x_at = x_ptr + m[:, None] * stride_xm + (word * 8)[None, :]
                part = tl.zeros([16, BLOCK_N], tl.float32)
                xs = tl.zeros([16, GW], tl.float32)
                for j in tl.static_range(4):
                    if ASM:
                        lo, hi = _magic_pair_asm(words, j, MAGIC_BITS)
                    else:
                        lo = _magic_code(words, j, MAGIC_BITS, dtype)
                        hi = _magic_code(words, j + 4, MAGIC_BITS, dtype)
                    part, x_lo = _mma_step(part, x_at, xmask, lo, j, DOT_F32)
                    part, x_hi = _mma_step(part, x_at, xmask, hi, j + 4, DOT_F32)
                    xs += x_lo + x_hi
                xsum = tl.sum(xs, axis=1)
            s = tl.load(s_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + g * N + n, mask=nmask, other=0.0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            acc += part * s[None, :] - xsum[:, None] * ((MAGIC + z) * s)[None, :]
        _reduce_store(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, pid_n, pid_k, HAS_BIAS,
                      SPLIT_K, ATOMIC)


def _group_words(group_size: int, kind: str) -> int:
    """Words per group (a power of two, >= 16 for the tensor-core kind's K of 16), or a ValueError."""
    gw = group_size // 8
    if group_size % 8 or gw & (gw - 1):
        raise ValueError(f"the W4 GEMV needs a group size of 8 x a power of two; got {group_size}")
    if kind.startswith("mma") and gw < 16:
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


def _norm_launch(norm: PrologueNorm | PrologueRms | None, x: torch.Tensor) -> dict:
    """The ``kmajor`` kernel's NORM arguments (the norm weight as pairs; or the sums' slot)."""
    if norm is None:
        return {}
    if isinstance(norm, PrologueRms):
        return rms_launch(norm) | dict(NORM=2)
    k = x.shape[1]
    if norm.weight.shape != (k,) or norm.weight.dtype != x.dtype:
        raise ValueError(f"the norm prologue's weight must be [{k}] in {x.dtype}; got {tuple(norm.weight.shape)} "
                         f"{norm.weight.dtype}")
    return dict(nw_ptr=norm.weight.contiguous().view(torch.int32), eps=norm.eps, NORM=1)


def w4_gemv(x: torch.Tensor, weight: PackedWeight | KMajorWeight, config: W4GemvConfig,
            bias: torch.Tensor | None = None, act_mul: bool = False,
            norm: PrologueNorm | PrologueRms | None = None, residual: torch.Tensor | None = None,
            next_norm: EpilogueNorm | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M <= 16) times the dequantized 4-bit weight (+ bias) -> [M, N] in x's dtype;
    ``kmajor`` takes ``repack_k_major``'s weight, the other kinds the PackedWeight as loaded. ``act_mul``
    (``kmajor`` only): the weight is a fused gate|up projection and the result silu(gate) * up [M, N / 2], the
    SiLU-and-mul kernel's output (kernels/activation.py) made in this kernel's epilogue. ``norm`` (``kmajor``
    only): x is the input of the RMSNorm before the projection, applied in the kernel (PrologueNorm).
    ``residual`` (``kmajor`` only, not with act_mul): returns the projection plus ``residual``, rounded as the norm
    kernel's residual add (the next residual stream), in a new tensor; ``next_norm`` (with ``residual``) also
    writes the next norm's input for a ``PrologueRms`` consumer (EpilogueNorm)."""
    if (norm is not None or residual is not None) and config.kind != "kmajor":
        raise ValueError(f"the norm prologue and the residual epilogue take the 'kmajor' kind; got {config.kind!r}")
    if act_mul:
        if config.kind != "kmajor":
            raise ValueError(f"act_mul takes the 'kmajor' kind; got {config.kind!r}")
        check_act_mul(config.block_n, weight.out_features, "the K-major W4 GEMV")
    if (config.kind == "kmajor") != isinstance(weight, KMajorWeight):
        raise ValueError(f"the {config.kind!r} W4 GEMV takes a "
                         f"{'KMajorWeight (repack_k_major)' if config.kind == 'kmajor' else 'PackedWeight'}")
    if weight.bits != 4:
        raise ValueError(f"the W4 GEMV takes 4-bit weights; got {weight.bits}-bit")
    x = checked_input(x, weight, "w4_gemv")
    m, k = x.shape
    n = weight.out_features
    max_rows = MAX_ROWS if config.kind.startswith("mma") else FMA_MAX_ROWS
    if m > max_rows:
        raise ValueError(f"the {config.kind!r} W4 GEMV takes at most {max_rows} rows; got {m}")
    gw = _group_words(weight.group_size, config.kind)
    groups = k // weight.group_size
    zeros = weight.zeros if weight.zeros is not None else weight.scales
    bias_arg = bias if bias is not None else weight.scales
    common = dict(HAS_ZEROS=weight.zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=config.block_n, GW=gw,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kind == "kmajor":
        out = x.new_empty((m, n // 2 if act_mul else n))
        if m:
            chunk = next_power_of_2(groups) if config.groups == 0 else min(config.groups, next_power_of_2(groups))
            if x.stride(0) % 2:
                x = x.contiguous()
            launch = pdl_launch(x.device, m) if config.pdl else {}
            # preloading also runs without PDL (plain order, same arithmetic): the interpreter checks that path
            preload = min(config.preload_steps, -(-groups // chunk))
            # act_mul: each program holds block_n / 2 gate channels and their up channels
            per_program = config.block_n // 2 if act_mul else config.block_n
            _kmajor_kernel[(triton.cdiv(out.shape[1], per_program),)](
                x.view(torch.int32), weight.qweight, weight.scales, zeros, bias_arg, out, m, n, groups,
                x.stride(0) // 2, out.stride(0), 0x43000000, 0x41000000, ROWS=max(1, next_power_of_2(m)), CHUNK_G=chunk,
                X_BF16=x.dtype == torch.bfloat16, EVEN=out.shape[1] % per_program == 0 and groups % chunk == 0,
                PREFETCH=config.prefetch, PRELOAD=preload,
                L2_PREFETCH=preload > 1 and os.environ.get("TRITON_INTERPRET") != "1",  # inline PTX: GPU only
                ACT_MUL=act_mul, **_norm_launch(norm, x), **residual_launch(residual, m, n, x.dtype, act_mul),
                **next_norm_launch(next_norm, residual, m, n), **launch,
                **common)
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
                                    MAGIC=magic, ASM=config.asm, DOT_F32=dot_in_fp32(x.dtype),
                                    ONE_DOT=config.kind == "mma_k", **common)
    return out.to(x.dtype) if atomic else out
