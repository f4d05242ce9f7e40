"""The SiLU-and-mul epilogue the whole-K GEMVs share (kernels/w4_gemv.py ``kmajor``, kernels/fp8_stream.py ``fma``):
a fused gate|up projection (N = 2 D outputs, gate rows first) whose programs each take BLOCK_N / 2 gate channels and
the matching up channels, so the activation is applied to a program's own outputs and silu(gate) * up [M, D] is
stored in place of the projection: one launch (and one [M, 2 D] round trip) less than the pair. Each channel's
weights are a contiguous row of K in both layouts, so the pick is an index, not a repack.
"""

from __future__ import annotations

from tokenmill.kernels._triton import HAS_TRITON, tl, triton

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
        the other slot of the two-slot ring (kernels/w4_gemv.py ``NormSums``) for the next producer."""
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
