"""CPU decode attention over the paged cache: one block gather and one SDPA call per layer.

The reference (torch_backend.py) gathers K/V with advanced indexing, builds its masks per layer and multiplies
small bf16 matrices, which on a CPU costs far more than the arithmetic (SmolLM2-135M, 2 cores: ~0.24 ms a layer
at batch 1). Here every layer of a step shares one ``DecodePlan`` (the blocks each sequence reads and its mask,
built once per step), reads both K and V with one ``index_select`` over the blocks, and hands them to
``F.scaled_dot_product_attention`` with ``enable_gqa`` (no K/V repeat; PyTorch's CPU flash kernel keeps the
softmax in fp32). Exact caches of the query's dtype only: FP8 storage keeps the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata


@dataclass
class DecodePlan:
    """What the decode attention of every layer of one step shares (``TorchAttentionMetadata`` holds it)."""

    block_size: int
    block_index: torch.Tensor  # [num_seqs * blocks_per_seq] int64: the blocks each sequence reads, row by row
    blocks_per_seq: int
    keys_used: int  # keys SDPA reads per sequence: the sequence's length at batch 1, else whole blocks
    mask: torch.Tensor | None  # [num_seqs, 1, query_len, keys_used] bool (True: visible); None: all visible
    has_padding_slots: bool  # some new token has slot -1 (nothing to store)


    @classmethod
    def build(cls, meta: AttentionMetadata, block_size: int) -> DecodePlan:
        """From the metadata's tensors, not its host lists (graph-buffer metadata fills only the tensors);
        on CPU reading them is free. A padding row (length 0) sees key 0 rather than nothing (no NaN rows)."""
        query_len, seq_lens = meta.decode_query_len, meta.seq_lens.tolist()
        blocks_per_seq = max(1, -(-max(seq_lens) // block_size))
        block_index = meta.block_tables[:, :blocks_per_seq].reshape(-1).long()
        has_padding = bool((meta.slot_mapping < 0).any())
        if len(seq_lens) == 1 and query_len == 1 and seq_lens[0] > 0:  # the new token sees every key
            return cls(block_size, block_index, blocks_per_seq, seq_lens[0], None, has_padding)
        keys_used = blocks_per_seq * block_size
        # New token j of a sequence of length L sees keys < L - query_len + j + 1 (causal among the new tokens).
        ends = torch.tensor(seq_lens, dtype=torch.int64)[:, None] - query_len + 1 + torch.arange(query_len)
        mask = torch.arange(keys_used)[None, None, :] < ends.clamp(min=1)[:, :, None]  # [B, Q, keys]
        return cls(block_size, block_index, blocks_per_seq, keys_used, mask[:, None], has_padding)


def supports(query: torch.Tensor, cache: LayerKVCache, meta: AttentionMetadata, scaled: bool) -> bool:
    """A decode-shaped step on CPU over an exact cache of the query's dtype."""
    return (query.device.type == "cpu" and meta.decode_query_len > 0 and not scaled
            and cache.spec.dtype == query.dtype)


def store_and_attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache: LayerKVCache,
                     meta: AttentionMetadata, plan: DecodePlan, scale: float) -> torch.Tensor:
    """Write this step's keys/values, then attention of ``query`` [T, heads, dim] -> [T, heads, dim]."""
    cache.store_kv(key, value, meta.slot_mapping, has_padding=plan.has_padding_slots)
    num_tokens, num_heads, head_dim = query.shape
    query_len = meta.decode_query_len
    num_seqs = num_tokens // query_len
    # [2, B * blocks, block_size, Hkv, D] -> K and V [B, Hkv, keys, D] (strided views of the one gather)
    kv = cache.kv.index_select(1, plan.block_index)
    kv = kv.view(2, num_seqs, plan.blocks_per_seq * cache.block_size, cache.num_kv_heads, head_dim)
    kv = kv[:, :, : plan.keys_used].transpose(2, 3)
    q = query.view(num_seqs, query_len, num_heads, head_dim).transpose(1, 2)  # [B, H, Q, D]
    out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=plan.mask, scale=scale,
                                         enable_gqa=num_heads != cache.num_kv_heads)
    return out.transpose(1, 2).reshape(num_tokens, num_heads, head_dim)
