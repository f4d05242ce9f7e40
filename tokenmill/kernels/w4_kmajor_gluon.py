"""The K-major W4A16 GEMM's transposed product (kernels/w4_kmajor_gemm.py, ``w_lhs``) written in Gluon, Triton's
explicit-layout dialect, so the dequantized codes are built straight in the Hopper wgmma's register A-operand
layout: Triton's own compile (``KMajorGemmConfig(w_lhs=True)``) stores the codes to shared memory and reloads them
with ldmatrix, because its register-A hoisting passes only elementwise, non-narrowing ops from a load.

acc [BLOCK_N, BLOCK_M] = codes [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, BLOCK_M], stored transposed. The A operand's
linear layout (``gl.to_linear_layout`` of the DotOperandLayout) gives each lane, for each of its rows, columns
2 t, 2 t + 1 of every 8 (t = lane % 4); code column c = 8 TW q + 2 TW p + 2 t + e holds nibble 2 p + e of word
TW q + t (TW = min(4, KW) words of a row's step over the lanes), so the codes are a [n, q, p, t, e] tensor whose
layout is the operand's with c's bits split (``codes_layout``), the words [n, q, t] load in its slice, and the
reshape to [BLOCK_N, BLOCK_K] is checked trivial (no data movement) at compile time. x^T is gathered in the codes'
order (runs of 2 TW columns: 16-byte loads at TW = 4) into a wgmma-swizzled shared tile. The product is scaled
after each step (the module docstring of w4_kmajor_gemm.py: magic-number codes, s (part - (magic + z) sum x));
the next step's words and scales load before this step's product (register prefetch; x loads in its step; no
cp.async ring yet).
Split-K: kernels/splitk.py's partials + arrival counter protocol, restated in Gluon (``_store_transposed``, shared
with kernels/w4_kmajor_gluon_ring.py's pipelined version).

Needs Hopper (sm_90) and triton's Gluon (3.6 on the device). No CPU path: Triton's interpreter does not run Gluon.
tests/kernels/test_w4_kmajor_gemm.py checks it against fp32 on CUDA (and the index maths on CPU through a torch
model of the same formulas); benchmarks/gpu_w4_gemv_probe.py times it (``gluon=True`` configs).
"""

from __future__ import annotations

import torch

from tokenmill.kernels._triton import HAS_TRITON

try:  # Gluon ships with triton >= 3.5; its API is experimental
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import constexpr_function
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

    HAS_GLUON = HAS_TRITON
    cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier  # renamed after triton 3.6
except ImportError:
    HAS_GLUON = False


def code_columns(block_k: int, group_words: int) -> torch.Tensor:
    """x column (relative to the step's first) of each code column c: 2 GW p + 2 TW q + c mod 2 TW."""
    tw = min(4, block_k // 8)
    c = torch.arange(block_k)
    return 2 * group_words * ((c // (2 * tw)) % 4) + 2 * tw * (c // (8 * tw)) + c % (2 * tw)


def code_words(block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(word of the step, nibble) each code column c reads: word TW q + t, nibble 2 p + e."""
    tw = min(4, block_k // 8)
    c = torch.arange(block_k)
    return tw * (c // (8 * tw)) + (c // 2) % tw, 2 * ((c // (2 * tw)) % 4) + c % 2


if HAS_GLUON:

    @constexpr_function
    def codes_layout(a_ll, tw):
        """The A operand's linear layout over [n, c] re-indexed as [n, q, p, t, e] (c = 8 tw q + 2 tw p + 2 t + e;
        every basis is one bit of c, so each maps to one bit of q, p, t or e)."""
        def five(basis):
            r, c = basis
            return [r, c // (8 * tw), (c // (2 * tw)) % 4, (c // 2) % tw, c % 2]

        n, k = a_ll.shape
        return gl.DistributedLinearLayout([five(b) for b in a_ll.reg_bases], [five(b) for b in a_ll.lane_bases],
                                          [five(b) for b in a_ll.warp_bases], [], [n, k // (8 * tw), 4, tw, 2])

    @gluon.jit
    def _step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, step, groups,
                    HAS_ZEROS: gl.constexpr, KW: gl.constexpr, GW: gl.constexpr):
        """One K step's words [n, q, t], scales and zero points [n] (fp32)."""
        group = step // (GW // KW)  # a step never crosses a group (BLOCK_K divides it)
        words = gl.load(qw_ptr + w_off + step * KW, mask=w_mask, other=0)
        scale = gl.load(s_ptr + sn * groups + group).to(gl.float32)  # sn is clamped to real channels
        if HAS_ZEROS:
            zero = gl.load(z_ptr + sn * groups + group).to(gl.float32)
        else:
            zero = gl.full_like(scale, 8.0)
        return words, scale, zero

    @gluon.jit
    def _program_tile(M, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                      SPLIT_K: gl.constexpr):
        """(pid, pid_k, m0, n0, steps, first, last): the program's output tile (row tiles vary fastest: programs
        sharing a weight tile run together) and its split's [first, last) K steps (the last split may have fewer)."""
        pid = gl.program_id(0)
        pid_k = gl.program_id(1)
        num_m = gl.cdiv(M, BLOCK_M)
        steps = K // BLOCK_K
        per_split = gl.cdiv(steps, SPLIT_K)
        first = pid_k * per_split
        return (pid, pid_k, (pid % num_m) * BLOCK_M, (pid // num_m) * BLOCK_N, steps, first,
                gl.minimum(first + per_split, steps))

    @gluon.jit
    def _word_offsets(n0, N, stride_wn, BLOCK_N: gl.constexpr, QN: gl.constexpr, TW: gl.constexpr,
                      WL: gl.constexpr):
        """Offsets [n, q, t] of word TW q + t of each channel's step (or group), and the channel mask."""
        wn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
        wq = gl.arange(0, QN, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
        wt = gl.arange(0, TW, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))
        w_off = (gl.expand_dims(gl.expand_dims(wn * stride_wn, 1), 2) + gl.expand_dims(gl.expand_dims(TW * wq, 0), 2)
                 + gl.expand_dims(gl.expand_dims(wt, 0), 1))
        return w_off, gl.expand_dims(gl.expand_dims(wn < N, 1), 2)

    @gluon.jit
    def _finish_in_chunks(b_ptr, out_ptr, part_ptr, n0, m0, M, N, stride_om, HAS_BIAS: gl.constexpr,
                          SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                          FINISH_ROWS: gl.constexpr, WARPS: gl.constexpr):
        """The last arrival's sum of the SPLIT_K partials of the tile, FINISH_ROWS channels at a time: a lane reads
        consecutive channels (a partial row is [M, N], channels contiguous), the warps spread over the rows."""
        FL: gl.constexpr = gl.BlockedLayout([1, 1], [32, 1], [1, WARPS], [0, 1])
        for c in gl.static_range(BLOCK_N // FINISH_ROWS):
            cn = n0 + c * FINISH_ROWS + gl.arange(0, FINISH_ROWS, layout=gl.SliceLayout(1, FL))
            cm = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, FL))
            cmask = gl.expand_dims(cn < N, 1) & gl.expand_dims(cm < M, 0)
            c_off = gl.expand_dims(cm * N, 0) + gl.expand_dims(cn, 1)
            total = gl.zeros([FINISH_ROWS, BLOCK_M], gl.float32, FL)
            for s in gl.static_range(SPLIT_K):
                total += gl.load(part_ptr + s * M * N + c_off, mask=cmask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += gl.expand_dims(gl.load(b_ptr + cn, mask=cn < N, other=0.0).to(gl.float32), 1)
            gl.store(out_ptr + gl.expand_dims(cm * stride_om, 0) + gl.expand_dims(cn, 1),
                     total.to(out_ptr.dtype.element_ty), mask=cmask)

    @gluon.jit
    def _store_transposed(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, pid, pid_k, n0, m0, M, N, stride_om,
                          HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                          MMA: gl.constexpr, FINISH_ROWS: gl.constexpr = 0, WARPS: gl.constexpr = 4):
        """acc [BLOCK_N, BLOCK_M] (+ bias) into out [M, N] as its transpose; with SPLIT_K > 1 through
        kernels/splitk.py's protocol (partials in split order, the last arrival sums them and resets the counter),
        restated in Gluon (its ``splitk_finish`` is written for Triton's implicit layouts). ``FINISH_ROWS`` > 0: the
        last arrival sums FINISH_ROWS channels at a time in a blocked layout (``_finish_in_chunks``) instead of a
        second whole tile in the accumulator's layout, which spills at 128 x 128 and 256-row tiles (sm_90
        compiles: 72-560 bytes)."""
        ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
        COLS: gl.constexpr = gl.SliceLayout(0, MMA)
        on = n0 + gl.arange(0, BLOCK_N, layout=ROWS)
        om = m0 + gl.arange(0, BLOCK_M, layout=COLS)
        omask = gl.expand_dims(on < N, 1) & gl.expand_dims(om < M, 0)
        out_off = gl.expand_dims(om * stride_om, 0) + gl.expand_dims(on, 1)  # out [M, N] written as its transpose
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += gl.expand_dims(gl.load(b_ptr + on, mask=on < N, other=0.0).to(gl.float32), 1)
            gl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            part_off = gl.expand_dims(om * N, 0) + gl.expand_dims(on, 1)
            gl.store(part_ptr + pid_k * M * N + part_off, acc, mask=omask)
            cta_barrier()
            arrived = gl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                if FINISH_ROWS > 0:
                    _finish_in_chunks(b_ptr, out_ptr, part_ptr, n0, m0, M, N, stride_om, HAS_BIAS, SPLIT_K, BLOCK_N,
                                      BLOCK_M, FINISH_ROWS, WARPS)
                else:
                    total = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
                    for s in gl.static_range(SPLIT_K):
                        total += gl.load(part_ptr + s * M * N + part_off, mask=omask, other=0.0,
                                         cache_modifier=".cg")
                    if HAS_BIAS:
                        total += gl.expand_dims(gl.load(b_ptr + on, mask=on < N, other=0.0).to(gl.float32), 1)
                    gl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=omask)
                gl.atomic_xchg(cnt_ptr + pid, 0, sem="relaxed", scope="gpu")

    @gluon.jit(do_not_specialize=["M"])
    def _kmajor_gemm_gluon_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_om,
        HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GW: gl.constexpr, TW: gl.constexpr, MAGIC_BITS: gl.constexpr,
        MAGIC: gl.constexpr, WARPS: gl.constexpr,
    ):
        KW: gl.constexpr = BLOCK_K // 8
        QN: gl.constexpr = KW // TW
        S: gl.constexpr = GW * 8  # the group size
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        A_L: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        L5: gl.constexpr = codes_layout(gl.to_linear_layout(A_L, [BLOCK_N, BLOCK_K]), TW)  # [n, q, p, t, e]
        L4: gl.constexpr = gl.SliceLayout(4, L5)  # [n, q, p, t]
        WL: gl.constexpr = gl.SliceLayout(2, L4)  # words [n, q, t]
        XL: gl.constexpr = gl.BlockedLayout([2 * TW, 1], [4, 8], [1, WARPS], [0, 1])  # a lane: one run of x
        XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_M], dtype, transposed=True)
        ROWS: gl.constexpr = gl.SliceLayout(1, MMA)
        COLS: gl.constexpr = gl.SliceLayout(0, MMA)

        pid, pid_k, m0, n0, steps, first, last = _program_tile(M, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
        groups = K // S
        w_off, w_mask = _word_offsets(n0, N, stride_wn, BLOCK_N, QN, TW, WL)
        pp = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, L4))))
        ee = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
        shift_p = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(8 * pp, 0), 1), 3), 4)  # [1,1,4,1,1]
        shift_e = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(4 * ee, 0), 1), 2), 3)  # [1,1,1,1,2]
        c = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, XL))
        k_of_c = 2 * GW * ((c // (2 * TW)) % 4) + 2 * TW * (c // (8 * TW)) + c % (2 * TW)
        xm = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, XL))
        x_off = gl.expand_dims(k_of_c, 1) + gl.expand_dims(xm * stride_xm, 0)
        x_mask = gl.expand_dims(xm < M, 0)
        sn = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=ROWS), N - 1)  # clamped: rows past N are masked at the store

        x_smem = gl.allocate_shared_memory(dtype, [BLOCK_K, BLOCK_M], XS)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        words, scale, zero = _step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, gl.minimum(first, steps - 1),
                                         groups, HAS_ZEROS, KW, GW)
        for step in range(first, last):
            # the next step's words and scales go out before this step's product (the last iteration reloads its own)
            nxt = _step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, gl.minimum(step + 1, last - 1), groups,
                              HAS_ZEROS, KW, GW)
            col0 = (step // (GW // KW)) * S + 2 * KW * (step % (GW // KW))
            xt = gl.load(x_ptr + x_off + col0, mask=x_mask, other=0.0)
            codes = ((gl.expand_dims(gl.expand_dims(words, 2), 4) >> shift_p) >> shift_e) & 0xF
            a = (codes | MAGIC_BITS).to(gl.int16).to(dtype, bitcast=True)  # magic + code, exact
            a = gl.convert_layout(gl.reshape(a, [BLOCK_N, BLOCK_K]), A_L, assert_trivial=True)
            cta_barrier()  # every warpgroup's last product has read x_smem
            x_smem.store(xt)
            fence_async_shared()
            cta_barrier()
            part = warpgroup_mma(a, x_smem, gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA), use_acc=False)
            xsum = gl.convert_layout(gl.sum(xt.to(gl.float32), axis=0), COLS)
            acc += (part - gl.expand_dims(MAGIC + zero, 1) * gl.expand_dims(xsum, 0)) * gl.expand_dims(scale, 1)
            words, scale, zero = nxt

        _store_transposed(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, pid, pid_k, n0, m0, M, N, stride_om, HAS_BIAS,
                          SPLIT_K, BLOCK_N, BLOCK_M, MMA)
