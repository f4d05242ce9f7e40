"""Per-tile steps the paged decode kernels share (kernels/paged_attention.py's per-sequence kernel and
kernels/paged_decode_packed.py's packed one): the query rows, a K/V tile (FP8 widened per DecodeConfig.kv_convert)
and the online-softmax update."""

from __future__ import annotations

from tokenmill.kernels._triton import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def widen_kv(x, q, KV_CONVERT: tl.constexpr):
        """An FP8 K/V tile as the products' operand dtype (DecodeConfig.kv_convert)."""
        if KV_CONVERT == "f16":
            return x.to(tl.float16)
        elif KV_CONVERT == "asm":
            # e4m3 pairs -> f16 pairs in PTX. Not pure on purpose: Triton then cannot move the operand's layout
            # change in front of the conversion (it does for casts, and gathers FP8 bytes one by one out of shared
            # memory for the transposed V operand: 2.4x the loop's SASS instructions and 177 registers vs 124,
            # sm_90 compile of bn64_w4_s2, triton 3.9); the widened tile takes the bf16 path (ldmatrix).
            return tl.inline_asm_elementwise(
                "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
                "cvt.rn.f16x2.e4m3x2 $1, hi; }",
                "=r,=r,r",
                [x.to(tl.uint8, bitcast=True)],
                dtype=tl.float16,
                is_pure=False,
                pack=4,
            )
        elif KV_CONVERT == "direct":
            return x.to(q.dtype)
        else:  # via fp32: the conversion every sm89+ target has
            return x.to(tl.float32).to(q.dtype)

    @triton.jit
    def load_query(q_ptr, tokens, heads, q_stride_b, q_stride_h, d, gmask, dmask, SCALED: tl.constexpr,
                    KV_CONVERT: tl.constexpr):
        """The rows' queries [G, D] (zeros in padding rows) as the score product's operand: fp16 (clamped to its
        range) when an FP8 cache widens to fp16."""
        q = tl.load(
            q_ptr + (tokens * q_stride_b + heads * q_stride_h)[:, None] + d[None, :],
            mask=gmask[:, None] & dmask[None, :],
            other=0.0,
        )
        if SCALED and (KV_CONVERT == "f16" or KV_CONVERT == "asm"):
            return tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
        else:
            return q

    @triton.jit
    def load_kv_tile(cache_ptr, v_offset, row, d, nmask, dmask, q, SCALED: tl.constexpr, KV_CONVERT: tl.constexpr):
        """K and V of the tile's keys (cache offsets ``row``), an FP8 cache's widened in registers (its scales are
        applied outside the products)."""
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + v_offset + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if SCALED:
            k = widen_kv(k, q, KV_CONVERT)
            v = widen_kv(v, q, KV_CONVERT)
        return k, v

    @triton.jit
    def online_softmax(s, v, m_i, l_i, acc, PRECISION: tl.constexpr, EMPTY_ROWS: tl.constexpr):
        """One tile of masked scores s [G, N] (log2 units, -inf where a key is not a row's) into the running max,
        sum and output. EMPTY_ROWS: a row may have seen no key yet; it stays at zero weight instead of
        exp2(-inf - -inf) = NaN."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        if EMPTY_ROWS:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc
