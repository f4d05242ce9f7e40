"""FP8-weight GEMV variants for 1-16 rows (issue 22's batch-1 target: FP8 decode >= 1.8x bf16), on the stored
layout (e4m3 weight [N, K], one fp32 scale per output channel; quantization/fp8.py), beside kernels/fp8_gemv.py's
split-K kernel; benchmarks/gpu_fp8_gemv_probe.py times them against it and cuBLAS bf16.

That kernel (sm_90 SASS of its K loop, compiled without a GPU by triton 3.6, the device's, and 3.9) spends ~6
instructions a weight at one row and shuffles x through shared memory every step; its 2-16 row tensor-core kind
converts each weight e4m3 -> f16 -> bf16, the second step an F2F on the slow conversion pipe (one a weight). The
variants (same compiles; ``python3 benchmarks/gpu_fp8_gemv_probe.py --sass``):

- ``fma`` (1-8 rows; 2.9-3.7 instructions a weight at 1 row, 4.1-4.5 at 2, 6.4-7.4 at 4): a program reduces
  ``block_n`` channels over all of K (no split-K, one launch, no workspace). Weights load as int32 words two at a
  time (8 bytes a thread a channel) and x as int64 quads (4 bf16, 16 bytes) along the same flat K dim, so both
  share one register layout (no shuffle): word j meets quad j. A word becomes four fp32 by two
  ``cvt.rn.f16x2.e4m3x2`` and four f16 -> f32 (``asm``; else Triton's own casts, which the interpreter runs),
  then one FMA a weight a row; the per-channel scale is applied once at the end. ``prefetch`` keeps the next
  step's words in flight during this step's arithmetic.
- ``mma`` (tensor cores, 1-16 rows padded to 16; 2.7-3.4 a weight at any row count): the weight tile becomes f16 (one cvt per two weights, exact)
  and x f16 after a power-of-two prescale (2^-XSHIFT: bf16 activations up to 2^(16+XSHIFT) stay finite, and the
  scale comes back exactly in the channel scale); out^T = W x^T so x's rows pad to 16 only. Split-K reduced in
  the same launch (kernels/splitk.py).

Both accumulate in fp32; tests/kernels/test_fp8_stream.py compares every kind with the fp32 product of x and
the dequantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import (
    HAS_TRITON,
    next_power_of_2,
    pdl_launch,
    pdl_wait,
    require_triton,
    tl,
    triton,
)
from tokenmill.kernels.gemv_epilogue import (
    EpilogueNorm,
    PrologueRms,
    check_act_mul,
    gemv_channels,
    next_norm_launch,
    residual_launch,
    rms_launch,
    rms_scaled,
    store_gemv_out,
)
from tokenmill.kernels.splitk import dot_in_fp32, fit_split_k, splitk_workspace

STREAM_KINDS = ("fma", "mma")
FMA_MAX_ROWS = 8  # past 8 rows the FMAs a weight outnumber what the tensor cores need
MMA_MAX_ROWS = 16
MMA_XSHIFT = 4  # x is multiplied by 2^-4 before f16: |x| < 2^20 stays finite, |x| > 2^-10 stays normal


@dataclass(frozen=True)
class Fp8StreamConfig:
    """One variant (see the module docstring for ``kind``).

    ``fma``: ``block_n`` channels a program, ``pairs`` int32 word pairs (8 weights each) of K a channel a step
    (a multiple of 32 x num_warps keeps every thread busy). ``mma``: [block_n, block_k] weight tiles, ``split_k``
    programs a tile's K range. ``asm`` (fma; GPU only, the interpreter takes Triton's casts) converts with inline
    PTX; ``prefetch`` (fma) loads the next step's words before this step's arithmetic; ``pdl``: launched with
    programmatic dependent launch where kernels/_triton.py's ``pdl_launch`` allows (Hopper, <= 64 rows).
    """

    kind: str = "fma"
    block_n: int = 8
    pairs: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    asm: bool = True
    prefetch: bool = False
    pdl: bool = True

    def __post_init__(self) -> None:
        if self.kind not in STREAM_KINDS:
            raise ValueError(f"FP8 stream GEMV kind {self.kind!r} is not one of {STREAM_KINDS}")
        for name in ("block_n", "pairs", "block_k"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two; got {value}")
        if self.kind == "mma" and (self.block_k < 16 or self.block_n < 16):
            raise ValueError(f"the 'mma' kind needs block_n and block_k >= 16 (tensor-core tiles); got "
                             f"{self.block_n} x {self.block_k}")
        if self.prefetch and self.kind != "fma":
            raise ValueError("prefetch=True is a variant of the 'fma' kind only")

    @property
    def max_rows(self) -> int:
        return FMA_MAX_ROWS if self.kind == "fma" else MMA_MAX_ROWS

    @property
    def name(self) -> str:
        tiles = (f"n{self.block_n}_p{self.pairs}" if self.kind == "fma"
                 else f"n{self.block_n}_k{self.block_k}_s{self.split_k}")
        asm = "_asm" if self.asm and self.kind == "fma" else ""
        return (f"{self.kind}{asm}_{tiles}_w{self.num_warps}_st{self.num_stages}"
                f"{'_pf' if self.prefetch else ''}{'' if self.pdl else '_nopdl'}")


if HAS_TRITON:
    from tokenmill.kernels.splitk import splitk_finish

    @triton.jit
    def _e4m3_byte(words, SHIFT: tl.constexpr):
        """Byte SHIFT / 8 of every int32 word, read as e4m3, in fp32."""
        return ((words >> SHIFT) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)

    @triton.jit
    def _e4m3_words(words, ASM: tl.constexpr):
        """The four e4m3 bytes of every int32 word (byte 0 first) as four fp32 tensors. ASM: two
        ``cvt.rn.f16x2.e4m3x2`` (bytes 0-1, 2-3) and four f16 -> f32 per word, in PTX (GPU only)."""
        if ASM:
            return tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi, a0, a1, b0, b1; .reg .b32 a, b; mov.b32 {lo, hi}, $4; "
                "cvt.rn.f16x2.e4m3x2 a, lo; cvt.rn.f16x2.e4m3x2 b, hi; mov.b32 {a0, a1}, a; mov.b32 {b0, b1}, b; "
                "cvt.f32.f16 $0, a0; cvt.f32.f16 $1, a1; cvt.f32.f16 $2, b0; cvt.f32.f16 $3, b1; }",
                "=r,=r,=r,=r,r", [words], dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True,
                pack=1)
        return _e4m3_byte(words, 0), _e4m3_byte(words, 8), _e4m3_byte(words, 16), _e4m3_byte(words, 24)

    @triton.jit
    def _x_quad(quads, X_BF16: tl.constexpr):
        """int64 words of four 16-bit activations -> four fp32 (element 0 first); bf16 by a shift or a mask."""
        lo = quads.to(tl.int32)  # the low 32 bits
        hi = (quads >> 32).to(tl.int32)
        if X_BF16:
            return ((lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True),
                    (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True))
        return ((lo & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (hi & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (hi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))

    @triton.jit
    def _fma_step(acc, words, quads, ASM: tl.constexpr, X_BF16: tl.constexpr):
        """acc [R, N, C] += the four weights of each word [1, N, C] times their x [R, 1, C]."""
        w0, w1, w2, w3 = _e4m3_words(words, ASM)
        x0, x1, x2, x3 = _x_quad(quads, X_BF16)
        return acc + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3

    @triton.jit(do_not_specialize=["M"])
    def _fp8_fma_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
        M, N, KW, stride_xq, stride_ww, stride_om,
        HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PAIRS: tl.constexpr,
        X_BF16: tl.constexpr, EVEN: tl.constexpr, ASM: tl.constexpr, PREFETCH: tl.constexpr,
        PDL: tl.constexpr = False, ACT_MUL: tl.constexpr = False, sums_ptr=None, eps=0.0, RMS: tl.constexpr = False,
        res_ptr=None, stride_resm=0, ADD_RESIDUAL: tl.constexpr = False, next_nw_ptr=None, h_ptr=None, stride_hm=0,
        next_sums_ptr=None, zero_ptr=None, NEXT_NORM: tl.constexpr = False,
    ):
        """Program: BLOCK_N channels over all of K. ``w_ptr``: the weight as int32 words [N, KW] (KW = K / 4,
        ``stride_ww`` in words); ``x_ptr``: x as int64 quads (``stride_xq`` in quads), quad j = word j's x. A step
        covers 2 PAIRS words a channel in one flat last dim whose contiguity is declared 2: words load 8 bytes at a
        time and x 16 (two quads), and every thread and warp sits along that dim in both tiles, so both get one
        register layout on every Triton version (3.6 breaks ties between the other dims differently from 3.9 and
        had shuffled each product through shared memory). ACT_MUL: a fused gate|up weight, silu(gate) * up out
        (kernels/gemv_epilogue.py). RMS (PrologueRms): x is the stream times the norm weight and the product is
        scaled by 1 / rms from the rows' sums of squares at ``sums_ptr``; ADD_RESIDUAL / NEXT_NORM: the residual
        add and the next norm's input in the epilogue (store_gemv_out)."""
        pdl_wait(PDL)
        pid = tl.program_id(0)
        n3 = gemv_channels(pid, N, BLOCK_N, ACT_MUL)[None, :, None]
        m3 = tl.arange(0, ROWS)[:, None, None]
        c3 = tl.max_contiguous(tl.arange(0, 2 * PAIRS), 2)[None, None, :]
        w_at = w_ptr + n3.to(tl.int64) * stride_ww + c3
        x_at = x_ptr + tl.minimum(m3, M - 1) * stride_xq + c3  # rows past M: copies of the last, not stored
        STEP: tl.constexpr = 2 * PAIRS
        acc = tl.zeros([ROWS, BLOCK_N, STEP], tl.float32)
        if PREFETCH:
            if EVEN:
                ahead = tl.load(w_at)
            else:
                ahead = tl.load(w_at, mask=(n3 < N) & (c3 < KW), other=0)
        for k0 in range(0, KW, STEP):
            if EVEN:
                if PREFETCH:
                    words = ahead
                    ahead = tl.load(w_at + (k0 + STEP), mask=(k0 + STEP + c3) < KW, other=0)
                else:
                    words = tl.load(w_at + k0)
                quads = tl.load(x_at + k0)
            else:
                kmask = (k0 + c3) < KW
                if PREFETCH:
                    words = ahead
                    ahead = tl.load(w_at + (k0 + STEP), mask=(n3 < N) & ((k0 + STEP + c3) < KW), other=0)
                else:
                    words = tl.load(w_at + k0, mask=(n3 < N) & kmask, other=0)
                quads = tl.load(x_at + k0, mask=kmask, other=0)
            acc = _fma_step(acc, words, quads, ASM, X_BF16)
        out = tl.sum(acc, axis=2)  # [ROWS, BLOCK_N]
        n2 = gemv_channels(pid, N, BLOCK_N, ACT_MUL)[None, :]
        out = out * tl.load(ws_ptr + n2, mask=n2 < N, other=0.0)
        if RMS:  # K = 4 KW
            out = rms_scaled(out, sums_ptr, M, 4 * KW, eps, ROWS)
        if HAS_BIAS:
            out += tl.load(b_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
        store_gemv_out(out, out_ptr, pid, M, N, stride_om, n2, ROWS, BLOCK_N, ACT_MUL, res_ptr, stride_resm,
                       ADD_RESIDUAL, next_nw_ptr, h_ptr, stride_hm, next_sums_ptr, zero_ptr, NEXT_NORM)

    @triton.jit(do_not_specialize=["M"])
    def _fp8_mma_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_om, x_prescale, x_unscale,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN: tl.constexpr, DOT_F32: tl.constexpr, PDL: tl.constexpr = False,
    ):
        """Program (channel tile, K split): out^T [BLOCK_N, 16] += W_f16 [BLOCK_N, BLOCK_K] x_f16^T, x prescaled
        by ``x_prescale`` (a power of two; ``x_unscale`` its inverse, applied with the channel scales)."""
        pdl_wait(PDL)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, 16)
        nmask = n < N
        mmask = m < M
        kk = tl.arange(0, BLOCK_K)
        steps = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(steps, SPLIT_K)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, steps)
        w_at = w_ptr + n.to(tl.int64)[:, None] * stride_wn + kk[None, :]
        x_at = x_ptr + m[:, None] * stride_xm + kk[None, :]
        acc = tl.zeros([BLOCK_N, 16], tl.float32)
        for step in range(first, last):
            k0 = step * BLOCK_K
            if EVEN:
                w = tl.load(w_at + k0)
            else:
                w = tl.load(w_at + k0, mask=nmask[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
            x = tl.load(x_at + k0, mask=mmask[:, None] & ((k0 + kk) < K)[None, :], other=0.0)
            if DOT_F32:  # the interpreter multiplies 16-bit floats' raw storage (kernels/splitk.py: dot_in_fp32)
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32) * x_prescale), acc, input_precision="ieee")
            else:  # Triton's e4m3 -> f16 cast is one cvt per two weights on sm_90 already
                acc = tl.dot(w.to(tl.float16), tl.trans((x.to(tl.float32) * x_prescale).to(tl.float16)), acc)
        result = tl.trans(acc) * (tl.load(ws_ptr + n, mask=nmask, other=0.0) * x_unscale)[None, :]
        splitk_finish(result, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, pid, pid_k, HAS_BIAS,
                      SPLIT_K)


def _checked(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp8_stream_gemv needs x [M, K] and weight [N, K]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"fp8_stream_gemv takes bf16/fp16 activations; got {x.dtype}")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_stream_gemv takes e4m3 weights; got {weight.dtype}")
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(f"fp8_stream_gemv needs one weight scale per output channel ({weight.shape[0]}); got "
                         f"{weight_scale.numel()}")
    return x if x.stride(1) == 1 else x.contiguous()


def fma_supported(k: int) -> bool:
    """The ``fma`` kind views weights as int32 words and x as int64 quads: K must be a multiple of 4."""
    return k % 4 == 0


def fp8_stream_gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, config: Fp8StreamConfig,
    bias: torch.Tensor | None = None, act_mul: bool = False, rms: PrologueRms | None = None,
    residual: torch.Tensor | None = None, next_norm: EpilogueNorm | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M <= config.max_rows) times (weight [N, K] e4m3 * weight_scale [N])^T (+ bias)
    -> [M, N] in x's dtype. ``act_mul`` (``fma`` kind): the weight is a fused gate|up projection and the result
    silu(gate) * up [M, N / 2] (kernels/gemv_epilogue.py). ``fma`` kind too: ``rms``, x is the next norm's input a
    producer made and the product is scaled by 1 / rms (PrologueRms); ``residual`` (not with act_mul), the product
    plus the residual stream (the next stream, rounded as the norm kernel's add); ``next_norm`` with it, the next
    norm's input for a PrologueRms consumer (EpilogueNorm)."""
    require_triton("fp8_stream_gemv")
    x = _checked(x, weight, weight_scale)
    m, k = x.shape
    n = weight.shape[0]
    if m > config.max_rows:
        raise ValueError(f"the {config.kind!r} FP8 stream GEMV takes at most {config.max_rows} rows; got {m}")
    if (rms is not None or residual is not None or next_norm is not None) and config.kind != "fma":
        raise ValueError(f"the rms prologue and the residual / next-norm epilogues take the 'fma' kind; got "
                         f"{config.kind!r}")
    if act_mul:
        if config.kind != "fma":
            raise ValueError(f"act_mul takes the 'fma' FP8 stream kind; got {config.kind!r}")
        check_act_mul(config.block_n, n, "the FP8 stream GEMV")
    out = x.new_empty((m, n // 2 if act_mul else n))
    if m == 0:
        return out
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    scale = weight_scale.reshape(-1).float()
    bias_arg = bias if bias is not None else scale
    interpret = dot_in_fp32(torch.bfloat16)  # True under TRITON_INTERPRET=1: no inline PTX there
    launch = pdl_launch(x.device, m) if config.pdl else {}
    if config.kind == "fma":
        if not fma_supported(k):
            raise ValueError(f"the 'fma' FP8 stream GEMV needs K % 4 == 0; got K = {k}")
        if x.stride(0) % 4 or x.storage_offset() % 4:
            x = x.contiguous()
        if weight.stride(0) % 4 or weight.storage_offset() % 4:
            weight = weight.contiguous()
        kw = k // 4
        per_program = config.block_n // 2 if act_mul else config.block_n  # act_mul: half gate, half up channels
        _fp8_fma_kernel[(triton.cdiv(out.shape[1], per_program),)](
            x.view(torch.int64), weight.view(torch.int32), scale, bias_arg, out,
            m, n, kw, x.stride(0) // 4, weight.stride(0) // 4, out.stride(0),
            HAS_BIAS=bias is not None, ROWS=next_power_of_2(m), BLOCK_N=config.block_n, PAIRS=config.pairs,
            X_BF16=x.dtype == torch.bfloat16, EVEN=out.shape[1] % per_program == 0 and kw % (2 * config.pairs) == 0,
            ASM=config.asm and not interpret, PREFETCH=config.prefetch, ACT_MUL=act_mul,
            RMS=rms is not None, **rms_launch(rms),
            **residual_launch(residual, m, n, x.dtype, act_mul), **next_norm_launch(next_norm, residual, m, n),
            **launch,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return out
    tiles = triton.cdiv(n, config.block_n)
    split = fit_split_k(config.split_k, m, n, tiles, triton.cdiv(k, config.block_k))
    work = splitk_workspace(x.device)
    shift = MMA_XSHIFT if x.dtype == torch.bfloat16 else 0  # fp16 x is already in range
    _fp8_mma_kernel[(tiles, split)](
        x, weight, scale, bias_arg, out, work.partials, work.counters,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0), 2.0 ** -shift, 2.0 ** shift,
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        EVEN=n % config.block_n == 0 and k % config.block_k == 0, DOT_F32=interpret, **launch,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
