"""Paged decode attention: a few query tokens per sequence against its K/V read through the block table.

One query token per sequence (plain decode), or 1 + k (a verification row of k draft tokens, causal among the
new tokens). GQA-aware (one program serves every query head of a KV head, and every new token, so K/V are
read once) and split-K (flash-decoding): long contexts split into partitions whose partial softmax results a
reduce kernel merges. The one-token case is a constexpr specialisation with no causal mask. An FP8 cache is read
as FP8 (half the bytes of bf16), widened to the query's dtype in registers, and its scales are folded in once:
the k scale into the softmax scale, the v scale into the normalized output.
"""

from __future__ import annotations

from dataclasses import dataclass

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
from tokenmill.kernels.paged_decode_config import DecodeConfig, decode_config, kv_convert
from tokenmill.kernels.paged_decode_packed import MAX_GRID_Y, paged_decode_packed


def paged_decode_reference(
    query: torch.Tensor,
    kv_cache: LayerKVCache | torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    query_len: int = 1,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B * query_len, Hq, D] -> out of the same shape; computed in fp32 per sequence (slow, exact).

    Token j of sequence i sits at position ``seq_lens[i] - query_len + j`` and sees the keys up to it.
    """
    cache = LayerKVCache.of(kv_cache)
    num_tokens, num_heads, _ = query.shape
    num_kv_heads = cache.num_kv_heads
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        keys, values = cache.gather_kv(block_tables[i], seq_len, k_scale, v_scale)
        keys, values = keys.float(), values.float()
        rows = slice(i * query_len, (i + 1) * query_len)
        q = query[rows].float().view(query_len, num_kv_heads, group, -1)  # [Q, Hkv, G, D]
        scores = torch.einsum("qhgd,thd->qhgt", q, keys) * scale
        ends = seq_len - query_len + 1 + torch.arange(query_len, device=query.device)  # visible keys per token
        visible = torch.arange(seq_len, device=query.device)[None, :] < ends[:, None]  # [Q, T]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[rows] = torch.einsum("qhgt,thd->qhgd", probs, values).reshape(query_len, num_heads, -1).to(query.dtype)
    return out


@dataclass(frozen=True)
class DecodePlan:
    """Launch shape of one decode call; fixed by (batch, heads, max blocks) so CUDA graphs can capture it."""

    num_splits: int
    partition_size: int  # tokens per split for a sequence of the planned max_len, a multiple of block_n
    block_n: int  # keys per inner iteration
    # Each sequence spreads its own length over the splits (partition = its length / num_splits, at least
    # this many tokens): in a CUDA graph planned for max_model_len a short sequence still fills the splits.
    # min_partition == partition_size gives every sequence the planned partition (the fixed layout).
    min_partition: int = 128


REDUCE_WIDTH = 64  # plan_decode's default cap on splits


def plan_decode(
    num_seqs: int,
    num_kv_heads: int,
    max_len: int,
    num_sms: int,
    block_n: int = 64,
    min_partition: int = 128,
    max_splits: int = REDUCE_WIDTH,
    waves: int = 4,
) -> DecodePlan:
    """Split the keys only when (sequence, KV head) programs alone would leave SMs idle.

    ``max_len`` is an upper bound on any sequence length (block-table width x block size), not the real
    lengths: splits past a sequence's end do nothing, and the plan needs no device-to-host sync.
    """
    if num_seqs <= 0 or num_kv_heads <= 0 or max_len <= 0 or num_sms <= 0:
        raise ValueError(
            f"plan_decode needs positive sizes; got num_seqs={num_seqs}, num_kv_heads={num_kv_heads}, "
            f"max_len={max_len}, num_sms={num_sms}"
        )
    programs = num_seqs * num_kv_heads
    # H100, round 2: splitting once programs >= SMs only added reduce work (B=32: 52 -> 55 us); below
    # that, ~4 programs per SM hid memory latency best (B=1, L=2048: 12.1 -> 9.6 us).
    wanted = 1 if programs >= num_sms else -(-waves * num_sms // programs)
    by_length = -(-max_len // min_partition)
    num_splits = max(1, min(wanted, by_length, max_splits))
    per_split = -(-max_len // num_splits)
    partition = -(-per_split // block_n) * block_n
    num_splits = -(-max_len // partition)
    floor = min(partition, -(-min_partition // block_n) * block_n)
    return DecodePlan(num_splits=num_splits, partition_size=partition, block_n=block_n, min_partition=floor)


def plan_for_config(config: DecodeConfig, num_seqs: int, num_kv_heads: int, max_len: int,
                    num_sms: int) -> DecodePlan:
    """The plan a launch config asks for: its key tile and its floor on a split's keys."""
    return plan_decode(num_seqs, num_kv_heads, max_len, num_sms, block_n=config.block_n,
                       min_partition=config.min_partition)


def count_leading_decodes(query_start_loc_cpu: list[int]) -> int:
    """How many sequences at the head of a packed batch have exactly one query token.

    A mixed batch that lists its decode sequences first (as vLLM v1's runner orders them) sends those to
    the GQA decode kernel and only the rest to the prefill kernel; decodes later in the batch still work,
    through the prefill kernel.
    """
    count = 0
    for start, end in zip(query_start_loc_cpu, query_start_loc_cpu[1:], strict=False):
        if end - start != 1:
            break
        count += 1
    return count


if HAS_TRITON:
    from tokenmill.kernels.paged_decode_tiles import load_kv_tile, load_query, online_softmax

    # Triton compiles a variant per divisibility of every int argument (== 1, % 16 == 0, other); these
    # follow the batch (block-table width, split geometry), so each new variant cost a mid-run compile
    # (measured: 0.5-0.7 s inside one timed step on the H100). Pointers into the step's packed metadata are
    # 16-byte aligned by transfer.upload_arrays, so their alignment class never changes.
    @triton.jit(do_not_specialize=["bt_stride", "num_splits", "min_partition"])
    def _paged_decode_kernel(
        q_ptr,
        cache_ptr,
        bt_ptr,
        seq_lens_ptr,
        out_ptr,
        part_out_ptr,
        part_lse_ptr,
        q_stride_b,
        q_stride_h,
        out_stride_b,
        out_stride_h,
        bt_stride,
        v_offset,
        qk_scale,
        num_splits,  # runtime, like min_partition: both follow the batch, and as constexprs every new
        min_partition,  # length compiled a new kernel (~0.3 s) in eager mixed steps
        k_scale_ptr,  # FP8 cache: dequantization scales (per tensor, or per KV head with SCALE_STRIDE 1)
        v_scale_ptr,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,  # rows: QUERY_LEN * GROUP (new token, query head of this KV head), padded
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        STRIDE_BLOCK: tl.constexpr,  # cache strides in elements: fixed per engine, so constants here
        STRIDE_TOKEN: tl.constexpr,
        STRIDE_HEAD: tl.constexpr,
        PDL: tl.constexpr = False,
        QUERY_LEN: tl.constexpr = 1,  # new tokens per sequence; 1 compiles without the causal mask
        SCALED: tl.constexpr = False,
        SCALE_STRIDE: tl.constexpr = 0,
        KV_CONVERT: tl.constexpr = "f32",
        HEADS_FASTEST: tl.constexpr = False,  # grid (kv_head, seq, split) instead of (seq, kv_head, split)
    ):
        pdl_wait(PDL)
        if HEADS_FASTEST:
            seq = tl.program_id(1).to(tl.int64)
            kv_head = tl.program_id(0)
        else:
            seq = tl.program_id(0).to(tl.int64)
            kv_head = tl.program_id(1)
        split = tl.program_id(2)
        if SCALED:  # s = q . (k_stored * k_scale): one multiply per score instead of one per key element
            qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head * SCALE_STRIDE)
        seq_len = tl.load(seq_lens_ptr + seq)
        partition = tl.maximum(min_partition, tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N)
        start = split * partition
        end = tl.minimum(start + partition, seq_len)

        r = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        if QUERY_LEN == 1:
            gmask = r < GROUP
            heads = kv_head * GROUP + r
            tokens = seq
        else:
            gmask = r < QUERY_LEN * GROUP
            qi = r // GROUP  # which new token; it sits at position seq_len - QUERY_LEN + qi
            heads = kv_head * GROUP + r % GROUP
            tokens = seq * QUERY_LEN + qi
            visible_end = seq_len - QUERY_LEN + 1 + qi  # keys [0, visible_end) are causal for this row
        q = load_query(q_ptr, tokens, heads, q_stride_b, q_stride_h, d, gmask, dmask, SCALED, KV_CONVERT)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = bt_ptr + seq * bt_stride
        n = start + tl.arange(0, BLOCK_N)
        block = tl.load(bt_row + n // BLOCK_SIZE, mask=n < end, other=0)
        for _ in range(start, end, BLOCK_N):
            nmask = n < end
            row = block.to(tl.int64) * STRIDE_BLOCK + (n % BLOCK_SIZE) * STRIDE_TOKEN + kv_head * STRIDE_HEAD
            k, v = load_kv_tile(cache_ptr, v_offset, row, d, nmask, dmask, q, SCALED, KV_CONVERT)
            # Next tile's block ids load while K/V are in flight: the table read leaves the critical path.
            n_next = n + BLOCK_N
            block = tl.load(bt_row + n_next // BLOCK_SIZE, mask=n_next < end, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N], log2 units
            if QUERY_LEN == 1:
                s = tl.where(nmask[None, :], s, float("-inf"))
            else:
                s = tl.where(nmask[None, :] & (n[None, :] < visible_end[:, None]), s, float("-inf"))
            # With several new tokens a row may see no key of this tile yet (the split ends past its position).
            m_i, l_i, acc = online_softmax(s, v, m_i, l_i, acc, PRECISION, QUERY_LEN > 1)
            n = n_next

        out_mask = gmask[:, None] & dmask[None, :]
        if SCALED:  # sum_t p_t (v_t * v_scale) = v_scale * sum_t p_t v_t
            acc = acc * tl.load(v_scale_ptr + kv_head * SCALE_STRIDE)
        # A runtime branch, not a constexpr: CUDA graphs at small batches capture only split plans, and a
        # constexpr made the first unsplit eager decode (a short mixed step) compile a variant mid-run.
        if num_splits == 1:
            res = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(
                out_ptr + (tokens * out_stride_b + heads * out_stride_h)[:, None] + d[None, :],
                res.to(out_ptr.dtype.element_ty),
                mask=out_mask,
            )
        else:
            # Partials: normalized output and log2-sum-exp per (token, head, split); fp32 scratch.
            idx = (tokens * NUM_KV_HEADS * GROUP + heads) * num_splits + split
            res = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(part_out_ptr + idx[:, None] * HEAD_DIM + d[None, :], res, mask=out_mask)
            tl.store(part_lse_ptr + idx, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=gmask)

    @triton.jit(do_not_specialize=["num_splits"])
    def _paged_decode_reduce_kernel(
        part_out_ptr,
        part_lse_ptr,
        out_ptr,
        out_stride_b,
        out_stride_h,
        num_splits,
        NUM_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        # Splits past a sequence's end wrote lse = -inf and zeros, so every split can be read without
        # first loading seq_len (one dependent load fewer on this short kernel's critical path).
        seq = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        smask = s < num_splits
        base = (seq * NUM_HEADS + head) * num_splits
        lse = tl.load(part_lse_ptr + base + s, mask=smask, other=float("-inf"))
        parts = tl.load(
            part_out_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
            mask=smask[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        )
        m = tl.maximum(tl.max(lse, axis=0), -1e30)  # finite even when no split saw a key (seq_len 0)
        w = tl.exp2(lse - m)
        res = tl.sum(parts * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
        tl.store(
            out_ptr + seq * out_stride_b + head * out_stride_h + d,
            res.to(out_ptr.dtype.element_ty),
            mask=d < HEAD_DIM,
        )


def paged_decode(
    query: torch.Tensor,
    kv_cache: LayerKVCache | torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    plan: DecodePlan | None = None,
    num_sms: int | None = None,
    out: torch.Tensor | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    query_len: int = 1,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """query [B * query_len, Hq, D] (``query_len`` new tokens per sequence, causal among themselves) ->
    [B * query_len, Hq, D]. seq_lens 0 gives zeros (padding rows). ``k_scale``/``v_scale``: an FP8 cache's
    dequantization scales (float32, shape () or [num_kv_heads]).

    ``config``: the launch (kernels/paged_decode_config.py; None: the measured table's entry for this device,
    KV dtype and batch); ``num_warps``/``num_stages`` override its fields. A given ``plan`` keeps its own
    block_n and min_partition; without one the plan takes the config's.

    K/V are indexed [K/V, block, token, head, dim] through the cache object's strides, so a head-major storage
    works too (measured on the H100: no faster, gpu_kernels_decode_layout_2026-11-24.json).

    No host sync: the plan depends only on shapes, so the same launch can be captured in a CUDA graph.
    """
    require_triton("paged_decode")
    cache = LayerKVCache.of(kv_cache)
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads, cache_head_dim = cache.block_size, cache.num_kv_heads, cache.head_dim
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads/dim ({num_heads}, {head_dim}) must be a multiple of the cache's KV heads and match "
            f"its head_dim ({num_kv_heads}, {cache_head_dim})"
        )
    num_seqs = num_tokens // max(query_len, 1)
    if query_len < 1 or num_tokens % query_len or block_tables.shape[0] < num_seqs:
        raise ValueError(f"paged_decode needs {query_len} query tokens per sequence and a block-table row for "
                         f"each; got {num_tokens} tokens and {block_tables.shape[0]} rows")
    if query.stride(-1) != 1 or cache.kv.stride(-1) != 1:
        raise ValueError("query and the KV cache need a contiguous last axis")
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if config is None:
        config = decode_config(query.device, cache.spec.dtype, num_seqs)
    if plan is None:
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        plan = plan_for_config(config, num_seqs, num_kv_heads, block_tables.shape[1] * block_size, num_sms)
    launch = {"num_warps": num_warps or config.num_warps, "num_stages": num_stages or config.num_stages}
    group = num_heads // num_kv_heads
    k_scale_arg, v_scale_arg, scaling = scale_launch_args(cache, k_scale, v_scale)
    options = {
        "BLOCK_D": max(16, next_power_of_2(head_dim)),
        "PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",
        "STRIDE_BLOCK": cache.strides[0],
        "STRIDE_TOKEN": cache.strides[1],
        "STRIDE_HEAD": cache.strides[2],
        **pdl_launch(query.device, num_seqs),
        "SCALED": scaling["SCALED"],
        "SCALE_STRIDE": scaling["SCALE_STRIDE"],
        "KV_CONVERT": kv_convert(config, cache.spec.dtype, query.device),
        **launch,
    }
    if config.seqs_per_program > 1 and plan.num_splits == 1 and query_len == 1:
        return paged_decode_packed(query, cache, block_tables, seq_lens, out, scale * 1.4426950408889634, plan.block_n,
                                   config, (k_scale_arg, v_scale_arg), options)
    split_shape = (num_tokens, num_heads, plan.num_splits) if plan.num_splits > 1 else (1, 1, 1)
    part_out = torch.empty((*split_shape, head_dim), dtype=torch.float32, device=query.device)
    part_lse = torch.empty(split_shape, dtype=torch.float32, device=query.device)
    heads_fastest = config.heads_fastest and num_seqs <= MAX_GRID_Y
    grid = (num_kv_heads, num_seqs, plan.num_splits) if heads_fastest else (num_seqs, num_kv_heads, plan.num_splits)
    _paged_decode_kernel[grid](
        query,
        cache.kv,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        cache.v_offset,
        scale * 1.4426950408889634,
        plan.num_splits,
        plan.min_partition,
        k_scale_arg,
        v_scale_arg,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=plan.block_n,
        BLOCK_G=max(16, next_power_of_2(query_len * group)),
        QUERY_LEN=query_len,
        HEADS_FASTEST=heads_fastest,
        **options,
    )
    if plan.num_splits > 1:
        _paged_decode_reduce_kernel[(num_tokens, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            plan.num_splits,
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            # One width for every split count up to the planner's cap: a width per count compiled a new
            # variant whenever a mixed step's block-table width moved the count (eager steps, mid-run).
            BLOCK_S=max(REDUCE_WIDTH, next_power_of_2(plan.num_splits)),
            BLOCK_D=options["BLOCK_D"],
            **pdl_launch(query.device, num_seqs),
            num_warps=4,
        )
    return out
