"""Paged decode attention: one query token per sequence against its K/V read through the block table.

GQA-aware (one program serves every query head of a KV head, so K/V are read once) and split-K
(flash-decoding): long contexts split into partitions whose partial softmax results a reduce kernel merges.
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


def paged_decode_reference(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query [B, Hq, D] -> out [B, Hq, D]; computed in fp32 per sequence (slow, exact)."""
    num_seqs, num_heads, _ = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        blocks = block_tables[i, : (seq_len + block_size - 1) // block_size].long()
        keys = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len].float()
        values = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len].float()
        q = query[i].float().view(num_kv_heads, group, -1)  # [Hkv, G, D]
        scores = torch.einsum("hgd,thd->hgt", q, keys) * scale
        probs = scores.softmax(dim=-1)
        out[i] = torch.einsum("hgt,thd->hgd", probs, values).reshape(num_heads, -1).to(query.dtype)
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
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        STRIDE_BLOCK: tl.constexpr,  # cache strides in elements: fixed per engine, so constants here
        STRIDE_TOKEN: tl.constexpr,
        STRIDE_HEAD: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        seq = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(seq_lens_ptr + seq)
        partition = tl.maximum(min_partition, tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N)
        start = split * partition
        end = tl.minimum(start + partition, seq_len)

        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gmask = g < GROUP
        dmask = d < HEAD_DIM
        heads = kv_head * GROUP + g
        q = tl.load(
            q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + d[None, :],
            mask=gmask[:, None] & dmask[None, :],
            other=0.0,
        )

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        bt_row = bt_ptr + seq * bt_stride
        n = start + tl.arange(0, BLOCK_N)
        block = tl.load(bt_row + n // BLOCK_SIZE, mask=n < end, other=0)
        for _ in range(start, end, BLOCK_N):
            nmask = n < end
            row = block.to(tl.int64) * STRIDE_BLOCK + (n % BLOCK_SIZE) * STRIDE_TOKEN + kv_head * STRIDE_HEAD
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(cache_ptr + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(cache_ptr + v_offset + row[:, None] + d[None, :], mask=kv_mask, other=0.0)
            # Next tile's block ids load while K/V are in flight: the table read leaves the critical path.
            n_next = n + BLOCK_N
            block = tl.load(bt_row + n_next // BLOCK_SIZE, mask=n_next < end, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N], log2 units
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
            n = n_next

        out_mask = gmask[:, None] & dmask[None, :]
        # A runtime branch, not a constexpr: CUDA graphs at small batches capture only split plans, and a
        # constexpr made the first unsplit eager decode (a short mixed step) compile a variant mid-run.
        if num_splits == 1:
            res = acc / tl.maximum(l_i, 1e-30)[:, None]
            tl.store(
                out_ptr + seq * out_stride_b + heads[:, None] * out_stride_h + d[None, :],
                res.to(out_ptr.dtype.element_ty),
                mask=out_mask,
            )
        else:
            # Partials: normalized output and log2-sum-exp per (seq, head, split); fp32 scratch.
            idx = (seq * NUM_KV_HEADS * GROUP + heads) * num_splits + split
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
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    plan: DecodePlan | None = None,
    num_sms: int | None = None,
    out: torch.Tensor | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """query [B, Hq, D] (one token per sequence) -> [B, Hq, D]. seq_lens 0 gives zeros (padding rows).

    kv_cache is indexed [K/V, block, token, head, dim] through its strides, so a head-major cache passed as a
    permuted view works too (measured on the H100: no faster, gpu_kernels_decode_layout_2026-11-24.json).

    No host sync: the plan depends only on shapes, so the same launch can be captured in a CUDA graph.
    """
    require_triton("paged_decode")
    num_seqs, num_heads, head_dim = query.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"query heads/dim ({num_heads}, {head_dim}) must be a multiple of the cache's KV heads and match "
            f"its head_dim ({num_kv_heads}, {cache_head_dim})"
        )
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("query and kv_cache need a contiguous last axis")
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if plan is None:
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(query.device).multi_processor_count
        plan = plan_decode(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, num_sms)
    group = num_heads // num_kv_heads
    split_shape = (num_seqs, num_heads, plan.num_splits) if plan.num_splits > 1 else (1, 1, 1)
    part_out = torch.empty((*split_shape, head_dim), dtype=torch.float32, device=query.device)
    part_lse = torch.empty(split_shape, dtype=torch.float32, device=query.device)
    block_d = max(16, next_power_of_2(head_dim))
    _paged_decode_kernel[(num_seqs, num_kv_heads, plan.num_splits)](
        query,
        kv_cache,
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
        kv_cache.stride(0),
        scale * 1.4426950408889634,
        plan.num_splits,
        plan.min_partition,
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_N=plan.block_n,
        BLOCK_G=max(16, next_power_of_2(group)),
        BLOCK_D=block_d,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        STRIDE_BLOCK=kv_cache.stride(1),
        STRIDE_TOKEN=kv_cache.stride(2),
        STRIDE_HEAD=kv_cache.stride(3),
        **pdl_launch(query.device, num_seqs),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if plan.num_splits > 1:
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
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
            BLOCK_D=block_d,
            **pdl_launch(query.device, num_seqs),
            num_warps=4,
        )
    return out
