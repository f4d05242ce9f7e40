"""The torch attention backend: batched decode path equals the per-sequence reference on random data."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import (
    TorchAttentionBackend,
    TorchAttentionMetadata,
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


# ---- the CPU decode path (attention/cpu_decode.py): one block gather + SDPA, its plan shared by the layers ----
def _cpu_decode_case(seq_lens, query_len, seed):
    """fp32 query and cache (random, non-contiguous block tables) and the backend's own metadata for them."""
    query, kv_cache, meta = _random_case(seq_lens=seq_lens, query_lens=[query_len] * len(seq_lens), seed=seed)
    backend = TorchAttentionBackend()
    meta = backend.build_metadata([query_len] * len(seq_lens), seq_lens, meta.block_tables.tolist(), 4, "cpu")
    return backend, query.float(), kv_cache.float(), meta


@pytest.mark.parametrize("seq_lens, query_len", [([13], 1), ([9, 1, 17, 4], 1), ([6, 11], 3), ([5], 2)])
def test_cpu_decode_path_matches_the_reference_in_fp32(seq_lens, query_len):
    backend, query, kv_cache, meta = _cpu_decode_case(seq_lens, query_len, seed=len(seq_lens) + query_len)
    key = torch.randn(query.shape[0], 2, 16, generator=torch.Generator().manual_seed(9))
    value = torch.randn(query.shape[0], 2, 16, generator=torch.Generator().manual_seed(10))
    expected_cache = kv_cache.clone()
    LayerKVCache(expected_cache).store_kv(key, value, meta.slot_mapping)
    expected = paged_attention_reference(query.double(), expected_cache.double(), meta, 0.3)
    got = backend.forward(query, key, value, kv_cache, meta, 0.3)
    assert torch.equal(kv_cache, expected_cache)  # the new keys/values landed in their slots
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_decode_path_in_bf16_is_close_to_the_fp32_reference():
    backend, query, kv_cache, meta = _cpu_decode_case([9, 30, 17, 4], 1, seed=4)
    new = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(11))
    bf16_cache = kv_cache.bfloat16()
    LayerKVCache(kv_cache).store_kv(new, new, meta.slot_mapping)
    expected = paged_attention_reference(query, kv_cache, meta, 0.25)
    got = backend.forward(query.bfloat16(), new.bfloat16(), new.bfloat16(), bf16_cache, meta, 0.25)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_cpu_decode_plan_is_built_once_per_step_and_reused_by_every_layer():
    backend, query, kv_cache, meta = _cpu_decode_case([9, 17], 1, seed=5)
    assert isinstance(meta, TorchAttentionMetadata) and meta.decode_plan is None
    new = torch.randn(2, 2, 16)
    first = backend.forward(query, new, new, kv_cache, meta, 0.3)
    plan = meta.decode_plan
    assert plan is not None and plan.mask is not None and plan.mask.shape == (2, 1, 1, plan.keys_used)
    second_layer_cache = torch.randn_like(kv_cache)
    second = backend.forward(query, new, new, second_layer_cache, meta, 0.3)
    assert meta.decode_plan is plan
    torch.testing.assert_close(second.double(), paged_attention_reference(query.double(), second_layer_cache.double(),
                                                                          meta, 0.3), rtol=1e-5, atol=1e-5)
    assert not torch.equal(first, second)
