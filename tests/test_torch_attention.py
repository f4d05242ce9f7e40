"""The torch attention backend: batched decode path equals the per-sequence reference on random data."""

from __future__ import annotations

import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import (
    TorchAttentionBackend,
    decode_attention_batched,
    paged_attention_reference,
)
from tokenmill.intmath import cdiv


def _random_case(seq_lens: list[int], query_lens: list[int], block_size: int = 4, heads: int = 6, kv_heads: int = 2,
                 dim: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(cdiv(s, block_size) for s in seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()  # non-contiguous block tables
    tables, used = [], 0
    for s in seq_lens:
        n = cdiv(s, block_size)
        tables.append(perm[used : used + n])
        used += n
    kv_cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=gen, dtype=torch.float64)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, "cpu")
    query = torch.randn(sum(query_lens), heads, dim, generator=gen, dtype=torch.float64)
    return query, kv_cache, meta


def _naive(query, kv_cache, meta, scale):
    """Loop over every query token and key: the plainest statement of causal paged attention."""
    out = torch.empty_like(query)
    block_size, heads, kv_heads = kv_cache.shape[2], query.shape[1], kv_cache.shape[3]
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        context = seq_len - (end - start)
        table = meta.block_tables[i].tolist()
        for j in range(end - start):
            visible = context + j + 1
            slots = [(table[t // block_size], t % block_size) for t in range(visible)]
            k = torch.stack([kv_cache[0, b, o] for b, o in slots])  # [visible, kv_heads, dim]
            v = torch.stack([kv_cache[1, b, o] for b, o in slots])
            for h in range(heads):
                kh = h // (heads // kv_heads)
                weights = torch.softmax((k[:, kh] @ query[start + j, h]) * scale, dim=0)
                out[start + j, h] = weights @ v[:, kh]
    return out


def test_reference_matches_naive_loops_with_context_and_chunks():
    query, kv_cache, meta = _random_case(seq_lens=[7, 13, 5], query_lens=[3, 13, 1])
    expected = _naive(query, kv_cache, meta, 0.25)
    got = paged_attention_reference(query, kv_cache, meta, 0.25)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_batched_decode_matches_reference():
    query, kv_cache, meta = _random_case(seq_lens=[9, 1, 17, 4], query_lens=[1, 1, 1, 1], seed=3)
    expected = paged_attention_reference(query, kv_cache, meta, 0.3)
    got = decode_attention_batched(query, kv_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.3)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_backend_writes_new_keys_then_attends():
    query, kv_cache, meta = _random_case(seq_lens=[6, 3], query_lens=[1, 1], seed=5)
    key = torch.randn(2, 2, 16, dtype=torch.float64)
    value = torch.randn(2, 2, 16, dtype=torch.float64)
    out = TorchAttentionBackend().forward(query, key, value, kv_cache, meta, 0.25)
    flat = kv_cache.view(2, -1, 2, 16)
    assert torch.equal(flat[0, meta.slot_mapping], key) and torch.equal(flat[1, meta.slot_mapping], value)
    assert torch.allclose(out, _naive(query, kv_cache, meta, 0.25), rtol=1e-10, atol=1e-10)
