"""The K-major W4A16 GEMM's transposed product in Gluon, pipelined for 64-256 rows (``KMajorGemmConfig(gluon=True,
pipelined=True)``): kernels/w4_kmajor_gluon.py's kernel issues a synchronous wgmma after gathering x into shared
memory each step, so at 128-256 rows it waits on loads and on the tensor cores in turn. Here:

- x [BLOCK_M, BLOCK_K] tiles stream through a ``num_stages`` shared-memory ring by cp.async (16-byte copies, rows
  past M zero-filled), in natural K order: the wgmma's B operand is the tile's transposed view (K-major B);
- the wgmma is asynchronous with one chained fp32 accumulator: step i's product runs while step i + 1's codes are
  dequantized, and ``warpgroup_mma_wait(1)`` retires step i - 1's product (the codes reach it through a
  double-buffered shared tile, or, ``A_REGS``, as its register operand: see the variants below);
- codes are scaled before the product ((c - z) s in fp32, rounded to x's dtype: the w_lhs ``scale_codes`` variant),
  because scaling after it (w4_kmajor_gluon.py) needs each step's product apart from the accumulator, finished before
  it is scaled: a second fp32 tile and a wait a step, which is the serialization this kernel removes;
- BLOCK_N 128 channels on 8 warps (two warpgroups of 64), BLOCK_M up to 256 rows on the wgmma's N.

Natural K order works for the codes too: the A operand gives lane t of a row columns 2 t, 2 t + 1 of every 8, and
in the K-major layout column 2 GW p + 2 w + e of a group is nibble 2 p + e of word w; with w = 4 q + t, column
c = 2 GW p + 8 q + 2 t + e, so each lane reads whole words of its own (t, t + 4, ...) and the codes are a
[n, p, q, t, e] tensor whose layout is the operand's with c's bits split (``ring_codes_layout``), reshaped into the
operand with a compile-time-checked trivial conversion. A step covers BLOCK_K = 2 GW P columns of one group
(P = 1, 2 or 4 nibble pairs; P < 4 reloads a word's other nibbles next step, from L1). Needs group >= 32 (four
words a row, one a lane).

Variants (constexpr, from ``KMajorGemmConfig``): ``W_RING`` (``weight_ring``) copies each step's group of words
[BLOCK_N, GW] on the same ring (a step of less than a group copies its group again), read back from a row-swizzled
shared tile in the words' register layout, so STAGES - 2 steps of weights are in flight instead of one in registers;
the wait and barrier then come before the dequantization (it reads the landed words) and a second barrier after
the codes' store. ``PACKED`` (``pair_dequant``, integer zero points only) builds two codes of a byte in one bf16x2
/ f16x2 register by PTX (``_PAIR_BF16``), the fp32 path's exact result in half the instructions. ``A_REGS``
(``register_a``, with W_RING) hands the codes to the wgmma as its register A operand, no shared tile: wgmma reads
them asynchronously, and with one step a loop iteration ptxas wrote the next step's codes into the registers of the
product still in flight (the PTX reuses one register per operand across iterations); two steps an iteration give
each in-flight operand registers of its own (``benchmarks/triton_sass.wgmma_operand_hazards`` checks the SASS).

Ring protocol (prefetch distance STAGES - 2): iteration i waits for its own cp.async group, fences and barriers
(so every thread's copies are visible to the tensor cores, and every warpgroup has retired step i - 2's product),
then refills the stage step i - 2 used with step i + STAGES - 2. Split-K and the transposed store are
w4_kmajor_gluon.py's. Needs Hopper (sm_90) and triton's Gluon; no CPU path (the interpreter does not run Gluon):
tests/kernels/test_w4_kmajor_gemm.py checks the index maths on CPU (``ring_code_words``) and the kernel against
fp32 on CUDA; benchmarks/gpu_w4_gemv_probe.py times it.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.w4_kmajor_gluon import HAS_GLUON


def ring_block_k(block_k: int, group_size: int) -> int:
    """The K step the pipelined kernel takes: the config's, capped at the group, at least a quarter of it (one
    nibble pair of every word a step); groups of 32 and more (one word a lane)."""
    if group_size < 32 or group_size % 32:
        raise ValueError(f"pipelined=True needs a group size that is a multiple of 32; got {group_size}")
    return max(min(block_k, group_size), group_size // 4)


def ring_code_words(block_k: int, group_size: int, sub: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(word of the group, nibble) code column c of sub-step ``sub`` of a group reads: column
    c = 2 GW p + 8 q + 2 t + e (natural K order) is nibble 2 (sub P + p) + e of word 4 q + t."""
    gw = group_size // 8
    c = torch.arange(block_k)
    p, q, t, e = c // (2 * gw), (c // 8) % (gw // 4), (c // 2) % 4, c % 2
    return 4 * q + t, 2 * (sub * (block_k // (2 * gw)) + p) + e


if HAS_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import constexpr_function
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from tokenmill.kernels.w4_kmajor_gluon import _program_tile, _store_transposed, _word_offsets, cta_barrier

    # triton 3.6 (the device's) names cp.async async_copy_global_to_shared; later ones async_load (the old name raises)
    cp_async = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared

    @constexpr_function
    def ring_codes_layout(a_ll, gw):
        """The A operand's linear layout over [n, c] re-indexed as [n, p, q, t, e] (c = 2 gw p + 8 q + 2 t + e;
        every basis is one bit of c)."""
        def five(basis):
            r, c = basis
            return [r, c // (2 * gw), (c // 8) % (gw // 4), (c // 2) % 4, c % 2]

        n, k = a_ll.shape
        return gl.DistributedLinearLayout([five(b) for b in a_ll.reg_bases], [five(b) for b in a_ll.lane_bases],
                                          [five(b) for b in a_ll.warp_bases], [],
                                          [n, k // (2 * gw), gw // 4, 4, 2])

    @constexpr_function
    def words_2d_layout(w_ll):
        """The words' [n, q, t] layout as [n, 4 q + t]: how a lane reads its words of a ring stage (a row's GW words
        contiguous in shared memory), reshaped into [n, q, t] by a trivial conversion."""
        def two(basis):
            n, q, t = basis
            return [n, 4 * q + t]

        n, q, t = w_ll.shape
        return gl.DistributedLinearLayout([two(b) for b in w_ll.reg_bases], [two(b) for b in w_ll.lane_bases],
                                          [two(b) for b in w_ll.warp_bases], [], [n, 4 * q])

    @gluon.jit
    def _ring_copy(x_smem, x_off, x_mask, w_smem, w_src, w_mask, step, first, last, STAGES: gl.constexpr,
                   BLOCK_K: gl.constexpr, GW: gl.constexpr, SUBS: gl.constexpr, W_RING: gl.constexpr):
        """cp.async of step ``step``'s x tile, and with W_RING its group's words [BLOCK_N, GW], into their ring
        stages, one commit group a step (nothing copied past the split's last step; the group is committed either
        way, so the wait counts stay fixed)."""
        stage = (step - first) % STAGES
        if W_RING:
            cp_async(w_smem.index(stage), w_src + (step // SUBS) * GW, mask=w_mask & (step < last))
        cp_async(x_smem.index(stage), x_off + step * BLOCK_K, mask=x_mask & (step < last))
        async_copy.commit_group()

    # Two codes of one byte (nibbles 2 p, 2 p + 1: the operand's adjacent columns) to a bf16x2 / f16x2 register:
    # the byte is isolated and copied 12 bits up (t * 4097), so the nibbles land at bits 0-3 and 16-19 under the
    # magic exponent (bf16 0x4300 = 128 + c, f16 0x6400 = 1024 + c), then (magic + c) - (magic + z) (exact for
    # integer zero points) times the scale, rounded once: the fp32 path's result, in 5 instructions a pair instead
    # of ~10. $1 / $3: the pair's first word and shift (8 p; the second's are the same word and 8 p + 4). The trailing
    # comment names both elements' operands in the PTX, so a compile test checks that Triton packs those two.
    # lop3 LUT 234 = (a & b) | c; 983055 = 0x000F000F, 1124090624 = 0x43004300, 1677747200 = 0x64006400.
    _PAIR_BF16: gl.constexpr = gl.constexpr(
        "{ .reg .b32 t; shr.u32 t, $1, $3; and.b32 t, t, 255; mul.lo.u32 t, t, 4097; "
        "lop3.b32 t, t, 983055, 1124090624, 234; sub.rn.bf16x2 t, t, $6; mul.rn.bf16x2 $0, t, $5; } // pair $1 $2 $3 $4")
    _PAIR_F16: gl.constexpr = gl.constexpr(
        "{ .reg .b32 t; shr.u32 t, $1, $3; and.b32 t, t, 255; mul.lo.u32 t, t, 4097; "
        "lop3.b32 t, t, 983055, 1677747200, 234; sub.rn.f16x2 t, t, $6; mul.rn.f16x2 $0, t, $5; } // pair $1 $2 $3 $4")

    @gluon.jit
    def _scaled_codes(words, scale, zero, shift, dtype: gl.constexpr, A_L: gl.constexpr, BLOCK_N: gl.constexpr,
                      BLOCK_K: gl.constexpr, PACKED: gl.constexpr = False):
        """(c - z) s in x's dtype, built in the codes' 5-d layout and reshaped into the wgmma A operand; PACKED
        (integer zero points): two codes a register in x's dtype (``_PAIR_BF16``), else in fp32."""
        if PACKED:
            w5 = gl.expand_dims(gl.expand_dims(words, 1), 4)
            if dtype == gl.bfloat16:
                a = gl.inline_asm_elementwise(_PAIR_BF16, "=r,r,r,r,r,r,r", [w5, shift, scale.to(dtype),
                                              (zero + 128.0).to(dtype)], gl.bfloat16, True, 2)
            else:
                a = gl.inline_asm_elementwise(_PAIR_F16, "=r,r,r,r,r,r,r", [w5, shift, scale.to(dtype),
                                              (zero + 1024.0).to(dtype)], gl.float16, True, 2)
        else:
            codes = (gl.expand_dims(gl.expand_dims(words, 1), 4) >> shift) & 0xF
            c = (codes | 0x4B000000).to(gl.float32, bitcast=True) - 8388608.0  # 2^23 + c, minus 2^23: exact
            a = (c * scale - zero * scale).to(dtype)
        return gl.convert_layout(gl.reshape(a, [BLOCK_N, BLOCK_K]), A_L, assert_trivial=True)

    @gluon.jit
    def _ring_step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, step, groups, HAS_ZEROS: gl.constexpr,
                         GW: gl.constexpr, SUBS: gl.constexpr, LOAD_WORDS: gl.constexpr):
        """One step's words [n, q, t] (the group's, shifted to the step's nibble pairs; zeros without LOAD_WORDS:
        the words ring brings them) and its scale and zero point broadcast as [n, 1, 1, 1, 1] (fp32)."""
        group = step // SUBS
        if LOAD_WORDS:
            words = gl.load(qw_ptr + w_off + group * GW, mask=w_mask, other=0) >> (8 * (4 // SUBS) * (step % SUBS))
        else:
            words = gl.zeros_like(w_off)
        scale = gl.load(s_ptr + sn * groups + group).to(gl.float32)  # sn is clamped to real channels
        if HAS_ZEROS:
            zero = gl.load(z_ptr + sn * groups + group).to(gl.float32)
        else:
            zero = gl.full_like(scale, 8.0)
        scale = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(scale, 1), 1), 1), 1)
        zero = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(zero, 1), 1), 1), 1)
        return words, scale, zero

    @gluon.jit
    def _ring_codes(step, first, last, scale, zero, x_smem, x_off, x_mask, w_smem, w_src, w_copy_mask, qw_ptr, s_ptr,
                    z_ptr, w_off, w_mask, sn, groups, shift, HAS_ZEROS: gl.constexpr, PACKED: gl.constexpr,
                    STAGES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GW: gl.constexpr,
                    SUBS: gl.constexpr, Q: gl.constexpr, A_L: gl.constexpr, W2: gl.constexpr, WL: gl.constexpr):
        """The words ring's step: wait for the step's copies (every thread's: every warpgroup has also retired step
        - 2's product), refill step - 2's stages, read the words and build the codes (during step - 1's product);
        the next step's scales and zero points load. Returns (codes in the A operand layout, scale, zero)."""
        async_copy.wait_group(STAGES - 3)
        cta_barrier()
        _ring_copy(x_smem, x_off, x_mask, w_smem, w_src, w_copy_mask, step + STAGES - 2, first, last, STAGES, BLOCK_K,
                   GW, SUBS, True)
        stage_words = w_smem.index((step - first) % STAGES).load(W2)
        words = gl.convert_layout(gl.reshape(stage_words, [BLOCK_N, Q, 4]), WL, assert_trivial=True)
        words = words >> (8 * (4 // SUBS) * (step % SUBS))
        a = _scaled_codes(words, scale, zero, shift, x_smem.dtype, A_L, BLOCK_N, BLOCK_K, PACKED)
        _, scale, zero = _ring_step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, gl.minimum(step + 1, last - 1),
                                          groups, HAS_ZEROS, GW, SUBS, False)
        return a, scale, zero

    @gluon.jit
    def _register_product(a, x_smem, acc, step, first, STAGES: gl.constexpr):
        """The step's product with its codes as the register A operand, in flight until the next step's wait."""
        acc = warpgroup_mma(a, x_smem.index((step - first) % STAGES).permute((1, 0)), acc, is_async=True)
        return warpgroup_mma_wait(1, deps=[acc])  # step - 1's product done

    @gluon.jit(do_not_specialize=["M"])
    def _kmajor_gemm_gluon_ring_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
        M, N, K, stride_xm, stride_wn, stride_om,
        HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_M: gl.constexpr,
        BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, GW: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
        W_RING: gl.constexpr = False, PACKED: gl.constexpr = False, A_REGS: gl.constexpr = False,
        FINISH_ROWS: gl.constexpr = 0,
    ):
        P: gl.constexpr = BLOCK_K // (2 * GW)  # nibble pairs of every word a step
        SUBS: gl.constexpr = 4 // P  # steps a group
        Q: gl.constexpr = GW // 4
        dtype: gl.constexpr = x_ptr.dtype.element_ty
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        A_L: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
        L5: gl.constexpr = ring_codes_layout(gl.to_linear_layout(A_L, [BLOCK_N, BLOCK_K]), GW)  # [n, p, q, t, e]
        WL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(4, L5))  # words [n, q, t]
        SL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(1, gl.SliceLayout(1, gl.SliceLayout(1, L5))))  # [n]
        TPW_K: gl.constexpr = min(32, BLOCK_K // 8)  # 16-byte copies along K
        XL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_K, TPW_K], [WARPS, 1], [1, 0])
        XS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], dtype)
        AS: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], dtype)
        # the words ring (W_RING): 16-byte copies of a row's GW words; a lane then reads word 4 q + t of rows
        # 8 apart in a warp, so 4-word chunks are XOR-swizzled by the row (a 128-byte line holds 32 / GW rows)
        TPW_W: gl.constexpr = GW // 4
        WCL: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPW_W, TPW_W], [WARPS, 1], [1, 0])
        WS: gl.constexpr = gl.SwizzledSharedLayout(4, 32 // GW, GW // 4, [1, 0])
        W2: gl.constexpr = words_2d_layout(gl.to_linear_layout(WL, [BLOCK_N, Q, 4]))

        pid, pid_k, m0, n0, steps, first, last = _program_tile(M, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
        groups = K // (8 * GW)
        w_off, w_mask = _word_offsets(n0, N, stride_wn, BLOCK_N, Q, 4, WL)  # word 4 q + t of the group
        pp = gl.arange(0, P, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, gl.SliceLayout(4, L5)))))
        ee = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, L5)))))
        shift = (gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(8 * pp, 0), 2), 3), 4)
                 + gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(4 * ee, 0), 1), 2), 3))  # [1,P,1,1,2]
        sn = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=SL), N - 1)  # clamped: rows past N are masked at the store
        xm = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, XL))
        xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, XL))
        x_off = x_ptr + gl.expand_dims(xm * stride_xm, 1) + gl.expand_dims(xk, 0)
        x_mask = gl.expand_dims(xm < M, 1)

        x_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], XS)
        a_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K], AS)
        if W_RING:
            wcn = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, WCL))
            wcc = gl.arange(0, GW, layout=gl.SliceLayout(0, WCL))
            w_src = qw_ptr + gl.expand_dims(wcn * stride_wn, 1) + gl.expand_dims(wcc, 0)
            w_copy_mask = gl.expand_dims(wcn < N, 1)
            w_smem = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_N, GW], WS)
        else:  # unused: the copies take the x ring's operands in their place
            w_src = x_off
            w_copy_mask = x_mask
            w_smem = x_smem
        for i in gl.static_range(STAGES - 2):
            _ring_copy(x_smem, x_off, x_mask, w_smem, w_src, w_copy_mask, first + i, first, last, STAGES, BLOCK_K, GW,
                       SUBS, W_RING)
        words, scale, zero = _ring_step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, gl.minimum(first, steps - 1),
                                              groups, HAS_ZEROS, GW, SUBS, not W_RING)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        if A_REGS:
            # Two steps an iteration: each product's register operand is a value of its own (a PTX register the
            # next step's codes do not overwrite), rewritten only after the wait that retires its product.
            for step in range(first, last - 1, 2):
                a, scale, zero = _ring_codes(step, first, last, scale, zero, x_smem, x_off, x_mask, w_smem, w_src,
                                             w_copy_mask, qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, groups, shift,
                                             HAS_ZEROS, PACKED, STAGES, BLOCK_N, BLOCK_K, GW, SUBS, Q, A_L, W2, WL)
                acc = _register_product(a, x_smem, acc, step, first, STAGES)
                a_odd, scale, zero = _ring_codes(step + 1, first, last, scale, zero, x_smem, x_off, x_mask, w_smem,
                                                 w_src, w_copy_mask, qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, groups,
                                                 shift, HAS_ZEROS, PACKED, STAGES, BLOCK_N, BLOCK_K, GW, SUBS, Q, A_L,
                                                 W2, WL)
                acc = _register_product(a_odd, x_smem, acc, step + 1, first, STAGES)
            if (last - first) % 2 == 1:
                a_last, scale, zero = _ring_codes(last - 1, first, last, scale, zero, x_smem, x_off, x_mask, w_smem,
                                                  w_src, w_copy_mask, qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, groups,
                                                  shift, HAS_ZEROS, PACKED, STAGES, BLOCK_N, BLOCK_K, GW, SUBS, Q, A_L,
                                                  W2, WL)
                acc = _register_product(a_last, x_smem, acc, last - 1, first, STAGES)
        else:
            for step in range(first, last):
                if W_RING:
                    a, scale, zero = _ring_codes(step, first, last, scale, zero, x_smem, x_off, x_mask, w_smem, w_src,
                                                 w_copy_mask, qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn, groups, shift,
                                                 HAS_ZEROS, PACKED, STAGES, BLOCK_N, BLOCK_K, GW, SUBS, Q, A_L, W2, WL)
                    a_smem.index((step - first) % 2).store(a)
                    fence_async_shared()  # the codes' stores: visible to the tensor cores (async proxy)
                    cta_barrier()
                else:
                    a = _scaled_codes(words, scale, zero, shift, dtype, A_L, BLOCK_N, BLOCK_K, PACKED)  # during
                    words, scale, zero = _ring_step_loads(qw_ptr, s_ptr, z_ptr, w_off, w_mask, sn,  # step - 1's
                                                          gl.minimum(step + 1, last - 1), groups, HAS_ZEROS, GW, SUBS,
                                                          True)
                    # step - 2's product (this warpgroup's rows: the only ones it stores) was retired last iteration
                    a_smem.index((step - first) % 2).store(a)
                    async_copy.wait_group(STAGES - 3)  # this thread's copies of this step have landed
                    fence_async_shared()  # ... and the codes' stores: visible to the tensor cores (async proxy)
                    cta_barrier()  # every thread's, and every warpgroup has retired step - 2's product
                    _ring_copy(x_smem, x_off, x_mask, w_smem, w_src, w_copy_mask, step + STAGES - 2, first, last,
                               STAGES, BLOCK_K, GW, SUBS, W_RING)  # into step - 2's stage
                acc = warpgroup_mma(a_smem.index((step - first) % 2),
                                    x_smem.index((step - first) % STAGES).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=[acc])  # step - 1's product done: its stages are free
        acc = warpgroup_mma_wait(0, deps=[acc])
        async_copy.wait_group(0)  # the zero-filled copies past the split's last step
        _store_transposed(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, pid, pid_k, n0, m0, M, N, stride_om, HAS_BIAS,
                          SPLIT_K, BLOCK_N, BLOCK_M, MMA, FINISH_ROWS, WARPS)
