"""The SiLU-and-mul epilogue the whole-K GEMVs share (kernels/w4_gemv.py ``kmajor``, kernels/fp8_stream.py ``fma``):
a fused gate|up projection (N = 2 D outputs, gate rows first) whose programs each take BLOCK_N / 2 gate channels and
the matching up channels, so the activation is applied to a program's own outputs and silu(gate) * up [M, D] is
stored in place of the projection: one launch (and one [M, 2 D] round trip) less than the pair. Each channel's
weights are a contiguous row of K in both layouts, so the pick is an index, not a repack.

The same GEMVs' other epilogues live here too: the residual add (the next residual stream) and, with it, the next
RMSNorm's input (the stream times the norm weight, and its sums of squares in ``NormSums``) for a consumer GEMV that
then only scales by 1 / rms (``PrologueRms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, tl, triton

RING_ROWS = 8  # rows NormSums holds: the whole-K GEMVs serve at most 8 (kernels/w4_gemv.py FMA_MAX_ROWS)


@dataclass(frozen=True)
class NormSums:
    """A two-slot ring of the residual stream's per-row sums of squares ([2, RING_ROWS] fp32, zeros when made):
    the producer of slot s (o / down with ``residual`` and ``next_norm``) adds into it and zeroes slot 1 - s, its
    consumer (qkv / gate_up with ``PrologueRms``) reads it. Producers alternate slots, so each slot is zero when its
    producer starts (the one before zeroed it) without a memset, in a CUDA graph too; stream order keeps a
    consumer's reads before the next producer's zeroing. The sums are fp32 atomics, so their order (and the last bit
    of 1 / rms) may vary from run to run."""

    ring: torch.Tensor

    @staticmethod
    def make(device: torch.device) -> NormSums:
        return NormSums(torch.zeros(2, RING_ROWS, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class EpilogueNorm:
    """The next RMSNorm's input made in a ``residual`` GEMV's epilogue (the GEMVs' ``next_norm``): the stream
    times ``weight`` into ``normed`` ([M, N], x's dtype) and its sums of squares into ``sums`` slot ``slot``."""

    weight: torch.Tensor  # [N]
    normed: torch.Tensor
    sums: NormSums
    slot: int


@dataclass(frozen=True)
class PrologueRms:
    """The consumer's side of EpilogueNorm (the GEMVs' ``norm`` / ``rms``): x is the stream times the norm weight, and
    the outputs are scaled by 1 / rms from ``sums`` slot ``slot``: no pass over x, no norm weight in the K loop."""

    eps: float
    sums: NormSums
    slot: int


if HAS_TRITON:

    @triton.jit
    def gemv_channels(pid, N, BLOCK_N: tl.constexpr, ACT_MUL: tl.constexpr):
        """The program's output channels: BLOCK_N in a row, or (ACT_MUL) BLOCK_N / 2 gate channels j then their up
        channels N / 2 + j. Past the last: >= N (the gate half's lanes past N / 2 read up rows, masked at the
        store)."""
        lane = tl.arange(0, BLOCK_N)
        if ACT_MUL:
            HALF: tl.constexpr = BLOCK_N // 2
            return pid * HALF + lane % HALF + (lane // HALF) * (N // 2)
        return pid * BLOCK_N + lane

    @triton.jit
    def rms_scaled(out, sums_ptr, M, K, eps, ROWS: tl.constexpr):
        """out [ROWS, N] times each row's 1 / rms over K values from the sums of squares at ``sums_ptr`` (a
        PrologueRms consumer: its x is the stream times the norm weight, made by the producer before it)."""
        m1 = tl.arange(0, ROWS)
        sums = tl.load(sums_ptr + m1, mask=m1 < M, other=0.0)
        return out * (1.0 / tl.sqrt(sums / K + eps))[:, None]

    @triton.jit
    def store_gemv_out(out, out_ptr, pid, M, N, stride_om, n2, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       ACT_MUL: tl.constexpr, r_ptr=None, stride_rm=0, ADD_RESIDUAL: tl.constexpr = False,
                       nw_ptr=None, h_ptr=None, stride_hm=0, sums_ptr=None, zero_ptr=None,
                       NEXT_NORM: tl.constexpr = False):
        """out [ROWS, BLOCK_N] fp32 of channels ``n2`` ([1, BLOCK_N], gemv_channels') into out [M, N], or (ACT_MUL)
        silu(gate) * up into out [M, N / 2], rounded as the unfused pair rounds it: the projection's output in
        out's dtype, then kernels/activation.py's formula in fp32, then out's dtype. ADD_RESIDUAL: out + r
        ([M, N] at ``r_ptr``), rounded as the RMSNorm kernel's residual add rounds the projection's output and the
        sum (the next residual stream).

        NEXT_NORM (with ADD_RESIDUAL): the next RMSNorm's input made here too, so its consumer GEMV needs no pass of
        its own over x: h = the stream times the norm weight (``nw_ptr``, [N]) into ``h_ptr``, and the rows' sums of
        squares of the stream added (fp32 atomics) into ``sums_ptr`` [rows]; program 0 zeroes ``zero_ptr`` [rows],
        the other slot of the two-slot ring (``NormSums``) for the next producer."""
        m2 = tl.arange(0, ROWS)[:, None]
        if ADD_RESIDUAL:
            r = tl.load(r_ptr + m2 * stride_rm + n2, mask=(m2 < M) & (n2 < N), other=0.0).to(tl.float32)
            out = out.to(out_ptr.dtype.element_ty).to(tl.float32) + r
            if NEXT_NORM:
                live = (m2 < M) & (n2 < N)
                stream = out.to(out_ptr.dtype.element_ty).to(tl.float32)  # the stored residual stream
                nw = tl.load(nw_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
                tl.store(h_ptr + m2 * stride_hm + n2, (stream * nw).to(h_ptr.dtype.element_ty), mask=live)
                m1 = tl.arange(0, ROWS)
                tl.atomic_add(sums_ptr + m1, tl.sum(tl.where(live, stream * stream, 0.0), axis=1), mask=m1 < M,
                              sem="relaxed")
                if pid == 0:
                    tl.store(zero_ptr + m1, tl.zeros([ROWS], tl.float32), mask=m1 < M)
        if ACT_MUL:
            HALF: tl.constexpr = BLOCK_N // 2
            rounded = out.to(out_ptr.dtype.element_ty).to(tl.float32)
            gate, up = tl.split(tl.permute(tl.reshape(rounded, [ROWS, 2, HALF]), (0, 2, 1)))
            col = (pid * HALF + tl.arange(0, HALF))[None, :]
            act = gate / (1.0 + tl.exp(-gate))
            tl.store(out_ptr + m2 * stride_om + col, (act * up).to(out_ptr.dtype.element_ty),
                     mask=(m2 < M) & (col < N // 2))
        else:
            tl.store(out_ptr + m2 * stride_om + n2, out.to(out_ptr.dtype.element_ty), mask=(m2 < M) & (n2 < N))


def check_act_mul(block_n: int, out_features: int, what: str) -> None:
    """ValueError where the epilogue cannot pair gate and up channels."""
    if block_n < 2 or out_features % 2:
        raise ValueError(f"act_mul ({what}) needs block_n >= 2 and an even output width; got block_n {block_n}, "
                         f"{out_features} outputs")


def rms_launch(rms: PrologueRms | None) -> dict:
    """A whole-K GEMV kernel's arguments for ``rms_scaled`` (its flag, RMS, is set by the caller)."""
    return {} if rms is None else dict(sums_ptr=rms.sums.ring[rms.slot], eps=rms.eps)


def residual_launch(residual: torch.Tensor | None, rows: int, n: int, dtype: torch.dtype, act_mul: bool) -> dict:
    """A whole-K GEMV kernel's ADD_RESIDUAL arguments (store_gemv_out)."""
    if residual is None:
        return {}
    if act_mul:
        raise ValueError("the residual epilogue adds to the projection's output; act_mul replaces it")
    if residual.shape != (rows, n) or residual.dtype != dtype or residual.stride(-1) != 1:
        raise ValueError(f"the residual added in the epilogue must be [{rows}, {n}] {dtype}, rows contiguous; got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    return dict(res_ptr=residual, stride_resm=residual.stride(0), ADD_RESIDUAL=True)


def next_norm_launch(next_norm: EpilogueNorm | None, residual: torch.Tensor | None, rows: int, n: int) -> dict:
    """A whole-K GEMV kernel's NEXT_NORM arguments (store_gemv_out)."""
    if next_norm is None:
        return {}
    if residual is None:
        raise ValueError("next_norm normalizes the residual stream the epilogue makes: pass residual too")
    normed, ring = next_norm.normed, next_norm.sums.ring
    if normed.shape != (rows, n) or normed.dtype != residual.dtype or normed.stride(-1) != 1:
        raise ValueError(f"next_norm's output must be [{rows}, {n}] {residual.dtype}, rows contiguous; got "
                         f"{tuple(normed.shape)} {normed.dtype}")
    if next_norm.weight.shape != (n,) or rows > ring.shape[1] or next_norm.slot not in (0, 1):
        raise ValueError(f"next_norm: a [{n}] weight, at most {ring.shape[1]} rows and slot 0 or 1; got "
                         f"{tuple(next_norm.weight.shape)}, {rows} rows, slot {next_norm.slot}")
    return dict(next_nw_ptr=next_norm.weight, h_ptr=normed, stride_hm=normed.stride(0),
                next_sums_ptr=ring[next_norm.slot], zero_ptr=ring[1 - next_norm.slot], NEXT_NORM=True)
