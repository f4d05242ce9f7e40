"""Paged decode with several sequences a program (DecodeConfig.seqs_per_program 2 or 4): their query heads share the
padded GQA rows of one program and its K/V loop runs over all their keys (kernels/paged_attention.py dispatches here
for unsplit one-token plans). Short contexts at large batches then pay one set-up and one pipeline fill a pack."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, pdl_wait, tl, triton
from tokenmill.kernels.paged_decode_config import DecodeConfig

MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis (heads_fastest puts sequences or packs there)

if HAS_TRITON:
    from tokenmill.kernels.paged_decode_tiles import load_kv_tile, load_query, online_softmax

    @triton.jit
    def _seq_len(seq_lens_ptr, seq, num_seqs):
        """A packed sequence's length; 0 past the batch (the last pack may be short)."""
        return tl.load(seq_lens_ptr + seq, mask=seq < num_seqs, other=0)

    @triton.jit
    def _run_slot(n, e1, e2, e3):
        """Keys n of a pack's run: which packed sequence (0-3; the ends are increasing) and the position in it."""
        slot = (n >= e1).to(tl.int32) + (n >= e2).to(tl.int32) + (n >= e3).to(tl.int32)
        start = tl.where(n >= e3, e3, tl.where(n >= e2, e2, tl.where(n >= e1, e1, 0)))
        return slot, n - start

    @triton.jit
    def _run_block_ids(bt_ptr, bt_stride, first, n, e1, e2, e3, total, BLOCK_SIZE: tl.constexpr):
        """Cache block ids of keys n of the run (keys past it read nothing)."""
        slot, pos = _run_slot(n, e1, e2, e3)
        return tl.load(bt_ptr + (first + slot) * bt_stride + pos // BLOCK_SIZE, mask=n < total, other=0)

    @triton.jit
    def _tile_keys(t, t1, t2, t3, l0, l1, l2, l3, BLOCK_N: tl.constexpr):
        """Tile t of a pack walked tile-aligned (sequence j's keys fill tiles [t_j, t_j+1)): its sequence (0-3, a
        scalar), key positions in that sequence and the sequence's length."""
        slot = (t >= t1).to(tl.int32) + (t >= t2).to(tl.int32) + (t >= t3).to(tl.int32)
        first_tile = tl.where(t >= t3, t3, tl.where(t >= t2, t2, tl.where(t >= t1, t1, 0)))
        length = tl.where(slot == 0, l0, tl.where(slot == 1, l1, tl.where(slot == 2, l2, l3)))
        return slot, (t - first_tile) * BLOCK_N + tl.arange(0, BLOCK_N), length

    @triton.jit
    def _tile_block_ids(bt_ptr, bt_stride, first, t, t1, t2, t3, l0, l1, l2, l3, BLOCK_N: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr):
        """Cache block ids of tile t's keys (past the pack's last tile: none read)."""
        slot, n, length = _tile_keys(t, t1, t2, t3, l0, l1, l2, l3, BLOCK_N)
        return tl.load(bt_ptr + (first + slot) * bt_stride + n // BLOCK_SIZE, mask=n < length, other=0)

    @triton.jit(do_not_specialize=["bt_stride", "num_seqs"])
    def _paged_decode_packed_kernel(
        q_ptr,
        cache_ptr,
        bt_ptr,
        seq_lens_ptr,
        out_ptr,
        q_stride_b,
        q_stride_h,
        out_stride_b,
        out_stride_h,
        bt_stride,
        v_offset,
        qk_scale,
        num_seqs,
        k_scale_ptr,
        v_scale_ptr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PACK: tl.constexpr,  # sequences a program serves: 2 or 4
        BLOCK_G: tl.constexpr,  # rows: PACK * GROUP (sequence, query head of this KV head), padded
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        STRIDE_BLOCK: tl.constexpr,
        STRIDE_TOKEN: tl.constexpr,
        STRIDE_HEAD: tl.constexpr,
        PDL: tl.constexpr = False,
        SCALED: tl.constexpr = False,
        SCALE_STRIDE: tl.constexpr = 0,
        KV_CONVERT: tl.constexpr = "f32",
        HEADS_FASTEST: tl.constexpr = False,
        RUN: tl.constexpr = False,  # DecodeConfig.pack_keys "run" (else "tiles")
    ):
        """One query token of PACK sequences against one KV head, unsplit, in one pipelined loop over the pack's
        keys: sequence after sequence, as one dense run (RUN: a tile may hold the end of one and the start of the
        next; the key -> sequence map is per key) or tile-aligned (every sequence starts a tile: the map is per
        tile, scalars, but each sequence's last tile is part empty, as in the per-sequence kernel). Each score
        row keeps only its own sequence's keys, so every row's online softmax sees exactly its keys."""
        pdl_wait(PDL)
        if HEADS_FASTEST:
            pack = tl.program_id(1)
            kv_head = tl.program_id(0)
        else:
            pack = tl.program_id(0)
            kv_head = tl.program_id(1)
        first = pack.to(tl.int64) * PACK
        if SCALED:
            qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head * SCALE_STRIDE)
        # The packed sequences' lengths as scalars (vectors of them cost a [keys, PACK] compare and reductions a
        # tile: +60-80% loop instructions on sm_90); PACK 2 adds two empty sequences.
        l0 = _seq_len(seq_lens_ptr, first, num_seqs)
        l1 = _seq_len(seq_lens_ptr, first + 1, num_seqs)
        if PACK == 4:
            l2 = _seq_len(seq_lens_ptr, first + 2, num_seqs)
            l3 = _seq_len(seq_lens_ptr, first + 3, num_seqs)
        else:
            l2 = l0 * 0
            l3 = l0 * 0

        r = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        dmask = d < HEAD_DIM
        row_slot = r // GROUP  # which packed sequence a row belongs to
        seqs = first + row_slot
        gmask = (r < PACK * GROUP) & (seqs < num_seqs)
        heads = kv_head * GROUP + r % GROUP
        q = load_query(q_ptr, seqs, heads, q_stride_b, q_stride_h, d, gmask, dmask, SCALED, KV_CONVERT)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if RUN:  # where each sequence's keys end in the run
            e1 = l0
            e2 = e1 + l1
            e3 = e2 + l2
            total = e3 + l3
            n = tl.arange(0, BLOCK_N)
            block = _run_block_ids(bt_ptr, bt_stride, first, n, e1, e2, e3, total, BLOCK_SIZE)
            for _ in range(0, total, BLOCK_N):
                key_slot, pos = _run_slot(n, e1, e2, e3)
                nmask = n < total
                row = block.to(tl.int64) * STRIDE_BLOCK + (pos % BLOCK_SIZE) * STRIDE_TOKEN + kv_head * STRIDE_HEAD
                k, v = load_kv_tile(cache_ptr, v_offset, row, d, nmask, dmask, q, SCALED, KV_CONVERT)
                # Next tile's keys and block ids while K/V are in flight (as the per-sequence kernel does).
                n_next = n + BLOCK_N
                block = _run_block_ids(bt_ptr, bt_stride, first, n_next, e1, e2, e3, total, BLOCK_SIZE)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N], log2 units
                s = tl.where((key_slot[None, :] == row_slot[:, None]) & nmask[None, :], s, float("-inf"))
                # A row whose sequence has no key yet (its keys come in a later tile) stays at zero weight.
                m_i, l_i, acc = online_softmax(s, v, m_i, l_i, acc, PRECISION, True)
                n = n_next
        else:  # tile-aligned: where each sequence's tiles end
            t1 = tl.cdiv(l0, BLOCK_N)
            t2 = t1 + tl.cdiv(l1, BLOCK_N)
            t3 = t2 + tl.cdiv(l2, BLOCK_N)
            tiles = t3 + tl.cdiv(l3, BLOCK_N)
            block = _tile_block_ids(bt_ptr, bt_stride, first, 0, t1, t2, t3, l0, l1, l2, l3, BLOCK_N, BLOCK_SIZE)
            for t in range(0, tiles):
                slot, n, length = _tile_keys(t, t1, t2, t3, l0, l1, l2, l3, BLOCK_N)
                nmask = n < length
                row = block.to(tl.int64) * STRIDE_BLOCK + (n % BLOCK_SIZE) * STRIDE_TOKEN + kv_head * STRIDE_HEAD
                k, v = load_kv_tile(cache_ptr, v_offset, row, d, nmask, dmask, q, SCALED, KV_CONVERT)
                block = _tile_block_ids(bt_ptr, bt_stride, first, t + 1, t1, t2, t3, l0, l1, l2, l3, BLOCK_N,
                                        BLOCK_SIZE)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G, N], log2 units
                s = tl.where((row_slot[:, None] == slot) & nmask[None, :], s, float("-inf"))
                m_i, l_i, acc = online_softmax(s, v, m_i, l_i, acc, PRECISION, True)

        if SCALED:
            acc = acc * tl.load(v_scale_ptr + kv_head * SCALE_STRIDE)
        res = acc / tl.maximum(l_i, 1e-30)[:, None]  # a sequence of length 0 (graph padding) gives zeros
        tl.store(
            out_ptr + (seqs * out_stride_b + heads * out_stride_h)[:, None] + d[None, :],
            res.to(out_ptr.dtype.element_ty),
            mask=gmask[:, None] & dmask[None, :],
        )


def paged_decode_packed(
    query: torch.Tensor,
    cache: LayerKVCache,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    qk_scale: float,
    block_n: int,
    config: DecodeConfig,
    scale_args: tuple[torch.Tensor, torch.Tensor],
    options: dict[str, Any],
) -> torch.Tensor:
    """One query token a sequence, unsplit, ``config.seqs_per_program`` sequences a program (paged_decode's call:
    ``qk_scale`` in log2 units, ``options`` the launch constexprs both decode kernels share)."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = cache.num_kv_heads
    group = num_heads // num_kv_heads
    pack = config.seqs_per_program
    packs = -(-num_seqs // pack)
    heads_fastest = config.heads_fastest and packs <= MAX_GRID_Y
    _paged_decode_packed_kernel[(num_kv_heads, packs) if heads_fastest else (packs, num_kv_heads)](
        query,
        cache.kv,
        block_tables,
        seq_lens,
        out,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        cache.v_offset,
        qk_scale,
        num_seqs,
        *scale_args,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=cache.block_size,
        BLOCK_N=block_n,
        PACK=pack,
        BLOCK_G=max(16, next_power_of_2(pack * group)),
        HEADS_FASTEST=heads_fastest,
        RUN=config.pack_keys == "run",
        **options,
    )
    return out
