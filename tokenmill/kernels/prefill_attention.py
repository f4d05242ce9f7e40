"""Prefill / mixed-batch attention over the paged KV cache (flash-attention style, varlen, causal).

Query j of a sequence with ``context_len`` cached tokens sees keys 0 .. context_len + j, so prefix-cache hits
and chunked prefill need nothing special; scores never leave registers (online softmax). An FP8 cache is
widened to the query's dtype per tile; its k scale joins the softmax scale and its v scale the output.
"""

from __future__ import annotations

import torch

from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.kernels._triton import (
    HAS_TRITON,
    next_power_of_2,
    pdl_launch,
    pdl_wait,
    require_triton,
    tl,
    triton,
)
from tokenmill.kernels.kv_cache_write import scale_launch_args


def prefill_attention_reference(
    query: torch.Tensor,
    kv_cache: LayerKVCache | torch.Tensor,
    query_start_loc: list[int],
    seq_lens: list[int],
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [T, Hq, D] packed by ``query_start_loc``; computed in fp32 with an explicit mask (slow, exact)."""
    cache = LayerKVCache.of(kv_cache)
    num_kv_heads = cache.num_kv_heads
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    for i, seq_len in enumerate(seq_lens):
        lo, hi = query_start_loc[i], query_start_loc[i + 1]
        q_len = hi - lo
        if q_len == 0:
            continue
        keys, values = cache.gather_kv(block_tables[i], seq_len, k_scale, v_scale)
        keys = keys.float().repeat_interleave(group, dim=1)
        values = values.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[lo:hi].float(), keys) * scale
        context_len = seq_len - q_len
        visible = torch.ones(q_len, seq_len, dtype=torch.bool, device=query.device).tril(diagonal=context_len)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(query.dtype)
    return out


if HAS_TRITON:

    @triton.jit
    def _prefill_step(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        n0,
        kv_end,
        cache_ptr,
        bt_row_ptr,
        v_offset,
        kv_col,
        d,
        qk_scale,
        TOKEN_STRIDE: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        PRECISION: tl.constexpr,
        MASKED: tl.constexpr,
        SCALED: tl.constexpr,
    ):
        """One key tile of online softmax. MASKED tiles (the causal diagonal and the ragged end) pay for
        bounds and causal masks; the tiles every query sees in full skip them."""
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < kv_end
        dmask = d < HEAD_DIM
        if MASKED:
            block = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
            kv_mask = nmask[:, None] & dmask[None, :]
        else:
            block = tl.load(bt_row_ptr + n // BLOCK_SIZE).to(tl.int64)
            kv_mask = dmask[None, :]
        row = (block * BLOCK_SIZE + n % BLOCK_SIZE) * TOKEN_STRIDE + kv_col
        k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(cache_ptr + v_offset + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if SCALED:  # FP8 storage, widened in registers (the caller folds the scales in)
            k = k.to(tl.float32).to(q.dtype)  # via fp32: the conversion every sm89+ target has
            v = v.to(tl.float32).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            s = tl.where(nmask[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = m_new
        if MASKED:
            # A row that has seen no key yet keeps m = -inf; exponentiate against 0 there (p = 0, no NaN).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, l_i, m_new

    # The block-table width and the per-sequence arrays' offsets follow the batch: the arrays are sliced past
    # the leading decodes, so their alignment does too; without this each new width or alignment compiled a
    # variant mid-run.
    @triton.jit(do_not_specialize=["bt_stride", "bt_ptr", "qsl_ptr", "seq_lens_ptr"])
    def _prefill_kernel(
        q_ptr,
        cache_ptr,
        bt_ptr,
        qsl_ptr,
        seq_lens_ptr,
        out_ptr,
        q_stride_t,
        q_stride_h,
        out_stride_t,
        out_stride_h,
        bt_stride,
        v_offset,
        qk_scale,
        k_scale_ptr,
        v_scale_ptr,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        PDL: tl.constexpr = False,
        SCALED: tl.constexpr = False,
        SCALE_STRIDE: tl.constexpr = 0,
    ):
        pdl_wait(PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        if SCALED:
            qk_scale = qk_scale * tl.load(k_scale_ptr + (head // GROUP) * SCALE_STRIDE)
        # Last query tiles see the most keys: launch them first so the short ones fill the tail.
        tile = tl.num_programs(2) - 1 - tl.program_id(2)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len

        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
        d = tl.arange(0, BLOCK_D)
        rmask = rows < q_len
        dmask = d < HEAD_DIM
        q_tokens = (q_start + rows).to(tl.int64)
        io_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(
            q_ptr + q_tokens[:, None] * q_stride_t + head * q_stride_h + d[None, :], mask=io_mask, other=0.0
        )
        q_pos = context_len + rows  # absolute position of each query

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Keys this tile can see: up to its last query's position; tiles past q_len loop zero times.
        valid_tile = tile * BLOCK_M < q_len
        kv_end = tl.where(valid_tile, tl.minimum(seq_len, context_len + (tile + 1) * BLOCK_M), 0)
        # Keys 0 .. context_len + tile*BLOCK_M are visible to every row of the tile: no masks there.
        full_end = tl.where(valid_tile, (context_len + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N, 0)
        bt_row_ptr = bt_ptr + seq.to(tl.int64) * bt_stride
        kv_col = (head // GROUP) * HEAD_DIM
        for n0 in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _prefill_step(
                acc,
                l_i,
                m_i,
                q,
                q_pos,
                n0,
                kv_end,
                cache_ptr,
                bt_row_ptr,
                v_offset,
                kv_col,
                d,
                qk_scale,
                NUM_KV_HEADS * HEAD_DIM,
                BLOCK_SIZE,
                BLOCK_N,
                HEAD_DIM,
                PRECISION,
                False,
                SCALED,
            )
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, l_i, m_i = _prefill_step(
                acc,
                l_i,
                m_i,
                q,
                q_pos,
                n0,
                kv_end,
                cache_ptr,
                bt_row_ptr,
                v_offset,
                kv_col,
                d,
                qk_scale,
                NUM_KV_HEADS * HEAD_DIM,
                BLOCK_SIZE,
                BLOCK_N,
                HEAD_DIM,
                PRECISION,
                True,
                SCALED,
            )

        res = acc / tl.maximum(l_i, 1e-30)[:, None]
        if SCALED:
            res = res * tl.load(v_scale_ptr + (head // GROUP) * SCALE_STRIDE)
        tl.store(
            out_ptr + q_tokens[:, None] * out_stride_t + head * out_stride_h + d[None, :],
            res.to(out_ptr.dtype.element_ty),
            mask=io_mask,
        )


def prefill_attention(
    query: torch.Tensor,
    kv_cache: LayerKVCache | torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    # H100 round 3 (Llama-3-8B heads): best total over 4x512, 1x2048, 16x512 fresh and 8x512 over a
    # 1536-token prefix; within 11% of the best tile for each.
    block_m: int = 128,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [T, Hq, D] packed varlen -> [T, Hq, D]; keys (this step's included) come from the cache.

    Grid is (sequences, query heads, query tiles of the longest sequence); host data needed: max_query_len.
    """
    require_triton("prefill_attention")
    num_tokens, num_heads, head_dim = query.shape
    cache = LayerKVCache.of(kv_cache)
    block_size, num_kv_heads, cache_head_dim = cache.block_size, cache.num_kv_heads, cache.head_dim
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads/dim ({num_heads}, {head_dim}) must be a multiple of the cache's KV heads and match "
            f"its head_dim ({num_kv_heads}, {cache_head_dim})"
        )
    if query.stride(-1) != 1 or not cache.is_slot_major():
        raise ValueError("query needs a contiguous last axis and the KV cache storage must be contiguous")
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    if query.dtype == torch.float32:
        # fp32 tiles are twice the bytes: stay with the shapes measured to fit shared memory (round 1).
        block_m, num_stages = min(block_m, 64), min(num_stages, 2)
    grid = (num_seqs, num_heads, triton.cdiv(max_query_len, block_m))
    k_scale_arg, v_scale_arg, scaling = scale_launch_args(cache, k_scale, v_scale)
    _prefill_kernel[grid](
        query,
        cache.kv,
        block_tables,
        query_start_loc,
        seq_lens,
        out,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        cache.v_offset,
        scale * 1.4426950408889634,
        k_scale_arg,
        v_scale_arg,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        **pdl_launch(query.device, query.shape[0]),
        SCALED=scaling["SCALED"],
        SCALE_STRIDE=scaling["SCALE_STRIDE"],
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
