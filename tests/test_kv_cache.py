"""The KV-cache contract on CPU: the spec, the cache object's one torch layout reference, decode-shaped steps of
1 + k query tokens (torch reference vs dense causal attention computed directly), and backend-owned metadata and
CUDA-graph buffers (staged and read the way a replay would, without a GPU)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.graph_buffers import DecodeGraphBuffers
from tokenmill.attention.kv_cache import KVCache, LayerKVCache
from tokenmill.attention.metadata import MAX_DECODE_QUERY_LEN, AttentionMetadata, HostLayout
from tokenmill.attention.torch_backend import (
    TorchAttentionBackend,
    decode_attention_batched,
    paged_attention_reference,
)
from tokenmill.config import CacheConfig, KVCacheSpec
from tokenmill.intmath import cdiv
from tokenmill.kernels.paged_attention import paged_decode_reference


def test_spec_derives_block_arithmetic_and_bytes():
    spec = CacheConfig(block_size=16).kv_cache_spec(num_kv_heads=8, head_dim=128, model_dtype=torch.bfloat16)
    assert spec == KVCacheSpec(16, 8, 128, torch.bfloat16)
    assert [spec.blocks_for_tokens(n) for n in (0, 1, 16, 17, 33)] == [0, 1, 1, 2, 3]
    assert spec.bytes_per_block == 2 * 16 * 8 * 128 * 2
    assert KVCache.bytes_per_block(spec, num_layers=32) == 32 * spec.bytes_per_block
    assert spec.scale_shape is None
    assert KVCacheSpec(16, 8, 128, torch.bfloat16, "head").scale_shape == (8,)
    assert cdiv(7, 2) == 4 and cdiv(8, 2) == 4


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"cache_dtype": "int8"}, "kv cache dtype"),
    ({"cache_dtype": "auto", "calculate_kv_scales": True}, "FP8 KV cache"),
    ({"block_size": 3}, "block_size"),
])
def test_cache_config_rejects_what_it_cannot_run(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)


def test_engine_kwargs_take_vllms_kv_cache_dtype_name():
    from tokenmill.config import EngineConfig

    assert EngineConfig.from_kwargs(kv_cache_dtype="auto").cache.cache_dtype == "auto"
    assert EngineConfig.from_kwargs(kv_cache_dtype="fp8_e5m2").cache.cache_dtype == "fp8_e5m2"
    with pytest.raises(ValueError, match="kv cache dtype"):
        EngineConfig.from_kwargs(kv_cache_dtype="fp4")


def test_spec_rejects_unknown_scale_granularity():
    with pytest.raises(ValueError, match="granularity"):
        KVCacheSpec(16, 8, 128, torch.float32, "channel")


def test_cache_object_layout_store_and_gather():
    spec = KVCacheSpec(4, 2, 8, torch.float64)
    cache = KVCache(spec, num_layers=3, num_blocks=5, device="cpu")
    assert len(cache) == 3 and all(isinstance(layer, LayerKVCache) for layer in cache)
    layer = cache[1]
    assert cache.k_cache(1).shape == (5, 4, 2, 8) and cache.v_cache(1).data_ptr() == layer.kv[1].data_ptr()
    assert layer.v_offset == 5 * 4 * 2 * 8 and layer.strides == (64, 16, 8)
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64)
    value = torch.randn(6, 2, 8, generator=gen, dtype=torch.float64)
    table = torch.tensor([3, 0], dtype=torch.int32)  # positions 0..3 in block 3, 4..5 in block 0
    slots = torch.tensor([12, 13, 14, 15, 0, 1])
    cache.store_kv(1, key, value, slots)
    keys, values = layer.gather_kv(table, 6)
    assert torch.equal(keys, key) and torch.equal(values, value)
    assert torch.equal(cache.k_cache(0), torch.zeros_like(cache.k_cache(0)))  # other layers untouched
    # Padding slots (-1) are skipped.
    before = layer.kv.clone()
    layer.store_kv(key[:1] + 1, value[:1] + 1, torch.tensor([-1]))
    assert torch.equal(layer.kv, before)


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_scales_divide_on_store_and_multiply_on_gather(granularity):
    spec = KVCacheSpec(4, 2, 8, torch.float64, granularity)
    layer = KVCache(spec, 1, 3, "cpu")[0]
    gen = torch.Generator().manual_seed(1)
    key, value = torch.randn(2, 5, 2, 8, generator=gen, dtype=torch.float64)
    k_scale = torch.tensor(0.5) if granularity == "tensor" else torch.tensor([0.5, 4.0])
    v_scale = torch.full(spec.scale_shape, 2.0)
    layer.store_kv(key, value, torch.arange(5), k_scale, v_scale)
    stored_k = layer.k_cache.flatten(0, 1)[:5]
    per_head = k_scale.reshape(-1, 1) if k_scale.dim() else k_scale
    torch.testing.assert_close(stored_k, key / per_head)
    keys, values = layer.gather_kv(torch.tensor([0, 1]), 5, k_scale, v_scale)
    torch.testing.assert_close(keys.double(), key)
    torch.testing.assert_close(values.double(), value)


def test_backend_checks_scales_against_the_spec():
    backend = TorchAttentionBackend()
    meta = AttentionMetadata.build([2], [2], [[0]], 4, "cpu")
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    plain = KVCache(KVCacheSpec(4, 2, 8, torch.float32), 1, 2, "cpu")[0]
    with pytest.raises(ValueError, match="do not match"):
        backend.forward(q, k, v, plain, meta, 0.3, k_scale=torch.tensor(1.0), v_scale=torch.tensor(1.0))
    scaled = KVCache(KVCacheSpec(4, 2, 8, torch.float32, "tensor"), 1, 2, "cpu")[0]
    with pytest.raises(ValueError, match="pass k_scale"):
        backend.forward(q, k, v, scaled, meta, 0.3)
    # Scale 1 stores exact values: the same output as the unscaled cache.
    one = torch.tensor(1.0)
    got = backend.forward(q, k, v, scaled, meta, 0.3, k_scale=one, v_scale=one)
    torch.testing.assert_close(got, backend.forward(q, k, v, plain, meta, 0.3))


# ---- decode-shaped steps of 1 + k query tokens -------------------------------------------------------------
def _paged_case(seq_lens: list[int], query_len: int, block_size: int = 4, heads: int = 6, kv_heads: int = 2,
                dim: int = 16, seed: int = 0):
    """A cache of random keys in shuffled blocks, ``query_len`` new query tokens per sequence, and the same
    keys/values laid out densely per sequence for the direct computation."""
    gen = torch.Generator().manual_seed(seed)
    spec = KVCacheSpec(block_size, kv_heads, dim, torch.float64)
    num_blocks = sum(spec.blocks_for_tokens(s) for s in seq_lens) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    cache = KVCache(spec, 1, num_blocks, "cpu")[0]
    tables, dense, used = [], [], 0
    for s in seq_lens:
        n = spec.blocks_for_tokens(s)
        tables.append(perm[used : used + n])
        used += n
        k, v = torch.randn(2, s, kv_heads, dim, generator=gen, dtype=torch.float64)
        slots = torch.tensor([tables[-1][p // block_size] * block_size + p % block_size for p in range(s)])
        cache.store_kv(k, v, slots)
        dense.append((k, v))
    meta = AttentionMetadata.build([query_len] * len(seq_lens), seq_lens, tables, block_size, "cpu")
    query = torch.randn(query_len * len(seq_lens), heads, dim, generator=gen, dtype=torch.float64)
    return query, cache, meta, dense


def _dense_causal(query: torch.Tensor, dense, query_len: int, scale: float) -> torch.Tensor:
    """Plain causal attention per sequence: new token j at position L - query_len + j sees keys 0..that."""
    outs = []
    heads = query.shape[1]
    for i, (k, v) in enumerate(dense):
        group = heads // k.shape[1]
        kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, H, D]
        q = query[i * query_len : (i + 1) * query_len]
        seq_len = k.shape[0]
        scores = torch.einsum("qhd,lhd->hql", q, kk) * scale
        pos = torch.arange(seq_len - query_len, seq_len)
        mask = torch.arange(seq_len)[None, :] > pos[:, None]
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hql,lhd->qhd", probs, vv))
    return torch.cat(outs)


@pytest.mark.parametrize("query_len", [1, 2, 4, MAX_DECODE_QUERY_LEN])
def test_decode_references_match_dense_causal_attention(query_len):
    query, cache, meta, dense = _paged_case([9, 13, 8, 21], query_len, seed=query_len)
    assert meta.decode_query_len == query_len and meta.is_decode_only == (query_len == 1)
    expected = _dense_causal(query, dense, query_len, 0.3)
    batched = decode_attention_batched(query, cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.3,
                                       query_len)
    torch.testing.assert_close(batched, expected, rtol=1e-10, atol=1e-10)
    fp32 = paged_decode_reference(query, cache, meta.block_tables, meta.seq_lens, 0.3, query_len)
    torch.testing.assert_close(fp32.double(), expected, rtol=1e-5, atol=1e-5)  # the kernels' fp32 reference
    torch.testing.assert_close(paged_attention_reference(query, cache, meta, 0.3), expected, rtol=1e-10,
                               atol=1e-10)


def test_torch_backend_takes_the_batched_path_for_verification_rows():
    query, cache, meta, dense = _paged_case([7, 12, 30], 3, seed=5)
    # The new tokens' own keys arrive through forward: cut them off the cache and pass them as key/value.
    new_k = torch.cat([k[-3:] for k, _ in dense])
    new_v = torch.cat([v[-3:] for _, v in dense])
    cache.kv[:, :].zero_()
    for (k, v), table, seq_len in zip(dense, meta.block_tables.tolist(), meta.seq_lens_cpu, strict=True):
        slots = torch.tensor([table[p // 4] * 4 + p % 4 for p in range(seq_len - 3)], dtype=torch.int64)
        cache.store_kv(k[:-3], v[:-3], slots)
    got = TorchAttentionBackend().forward(query, new_k, new_v, cache, meta, 0.25)
    torch.testing.assert_close(got, _dense_causal(query, dense, 3, 0.25), rtol=1e-10, atol=1e-10)


def test_host_layout_marks_uniform_short_query_lengths():
    def layout(qlens):
        return HostLayout.build(qlens, [q + 5 for q in qlens], [[0, 1, 2, 3]] * len(qlens), 4)

    assert layout([1, 1, 1]).decode_query_len == 1
    assert layout([3, 3]).decode_query_len == 3
    assert layout([3, 1]).decode_query_len == 0  # mixed
    assert layout([MAX_DECODE_QUERY_LEN + 1] * 2).decode_query_len == 0  # a prefill, not a verification row


# ---- backend-owned metadata and graph buffers ----------------------------------------------------------------
def test_backend_builds_its_metadata_from_the_layout():
    backend = TorchAttentionBackend()
    got = backend.build_metadata([2, 1], [5, 9], [[3, 1], [0, 2, 4]], 4, "cpu")
    want = AttentionMetadata.build([2, 1], [5, 9], [[3, 1], [0, 2, 4]], 4, "cpu")
    for field in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert (got.query_start_loc_cpu, got.seq_lens_cpu, got.max_seq_len) == (
        want.query_start_loc_cpu, want.seq_lens_cpu, want.max_seq_len)


@pytest.mark.parametrize("query_len", [1, 3])
def test_graph_buffers_replay_what_eager_attention_computes(query_len):
    """Stage a step into a backend's graph buffers (padded to a larger size) and run attention on the capture
    metadata, as a replayed graph would: the real rows equal the eager step, padding rows write no KV."""
    query, cache, meta, dense = _paged_case([6, 11], query_len, seed=7)
    backend = TorchAttentionBackend()
    buffers = backend.graph_buffers(max_batch=4, max_blocks=8, block_size=4, query_len=query_len, device="cpu")
    assert isinstance(buffers, DecodeGraphBuffers) and buffers.can_serve(meta)
    size = 4
    capture_meta = buffers.prepare_for_capture(size)
    buffers.prepare_for_replay(meta, size)
    tokens = 2 * query_len
    assert torch.equal(buffers.slot_mapping[tokens : size * query_len], torch.full((2 * query_len,), -1))
    assert buffers.seq_lens[2:size].tolist() == [0, 0]
    # Padding tokens carry garbage that must not reach the cache.
    padded = torch.cat([query, torch.randn(tokens, *query.shape[1:], dtype=query.dtype)])
    key = torch.randn(size * query_len, 2, 16, dtype=torch.float64)
    eager_cache = LayerKVCache(cache.kv.clone())
    eager = backend.forward(query, key[:tokens], key[:tokens], eager_cache, meta, 0.3)
    replayed = backend.forward(padded, key, key, cache, capture_meta, 0.3)
    torch.testing.assert_close(replayed[:tokens], eager, rtol=1e-10, atol=1e-10)
    assert torch.equal(cache.kv, eager_cache.kv)
    wrong_len = AttentionMetadata.build([query_len + 1] * 2, [7, 12], meta.block_tables.tolist(), 4, "cpu")
    assert not buffers.can_serve(wrong_len)
