"""Pure-torch paged attention: the reference every fast backend is tested against; runs on CPU.

Per sequence it gathers keys/values through the block table and runs causal attention where query j of a
sequence with ``context_len`` cached tokens sees keys ``0 .. context_len + j``.
"""

from __future__ import annotations

import torch

from tokenmill.attention.metadata import AttentionMetadata


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into their slots of the paged cache."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, num_kv_heads, head_dim] of one sequence, in position order."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len]
    values = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len]
    return keys, values


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """GQA attention without repeating K/V: q [..., Hkv, G*Q, D], keys/values [..., Hkv, L, D], visible
    broadcastable to [..., Hkv, G*Q, L]. Softmax in fp32. Plain matmuls beat SDPA's masked CPU path here."""
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax for half types, fp64 stays fp64
    scores = torch.matmul(q, keys.transpose(-1, -2)).to(acc) * scale
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


def paged_attention_reference(
    query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys (cache must already hold them)."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q = query[starts[i] : starts[i + 1]]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        keys, values = gather_kv(kv_cache, meta.block_tables[i], seq_len)
        context_len = seq_len - q_len
        # Causal with an offset: query j may see key t when t <= context_len + j.
        visible = torch.ones(q_len, seq_len, dtype=torch.bool, device=query.device).tril(diagonal=context_len)
        qh = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, Q, D]
        attn = masked_attention(
            qh.reshape(num_kv_heads, group * q_len, head_dim),
            keys.transpose(0, 1).to(query.dtype),
            values.transpose(0, 1).to(query.dtype),
            visible.repeat(group, 1),
            scale,
        )
        out[starts[i] : starts[i + 1]] = attn.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(
            q_len, num_heads, head_dim
        )
    return out


def decode_attention_batched(
    query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    max_seq_len: int, scale: float,
) -> torch.Tensor:
    """One query token per sequence, all sequences at once: gather K/V padded to max_seq_len, mask the tail.

    The per-sequence loop above costs one attention call per sequence per layer; batching decodes turns that
    into one call per layer (the CPU's hot path when many sequences decode together).
    """
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_blocks = -(-max_seq_len // block_size)
    tables = block_tables[:, :num_blocks].long()
    keys = kv_cache[0][tables].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    values = kv_cache[1][tables].reshape(num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    positions = torch.arange(num_blocks * block_size, device=query.device)
    mask = (positions[None, :] < seq_lens[:, None].long())[:, None, None, :]  # [B, 1, 1, L]
    group = num_heads // num_kv_heads
    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    out = masked_attention(
        q, keys.transpose(1, 2).to(query.dtype), values.transpose(1, 2).to(query.dtype), mask, scale
    )
    return out.reshape(num_seqs, num_heads, head_dim)


class TorchAttentionBackend:
    name = "torch"
    fuses_rotary = False  # the model rotates query/key (model/layers.py) before calling forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if rotary is not None:
            raise ValueError("the torch attention backend does not fuse rotary: rotate query/key first")
        write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        if meta.is_decode_only and meta.num_seqs > 1:
            return decode_attention_batched(
                query, kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
            )
        return paged_attention_reference(query, kv_cache, meta, scale)
