"""Each Triton kernel against its fp32 torch reference on fresh random inputs, bf16 and fp16, outputs poisoned.

Skips without CUDA + triton (runs on CPU under TRITON_INTERPRET=1 for kernel debugging).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_paged_batch, rel_err, requires_triton_device

from tokenmill.kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from tokenmill.kernels.kv_cache_write import reshape_and_cache, reshape_and_cache_reference
from tokenmill.kernels.paged_attention import paged_decode, paged_decode_reference, plan_decode
from tokenmill.kernels.prefill_attention import prefill_attention, prefill_attention_reference
from tokenmill.kernels.rms_norm import rms_norm_reference, rms_norm_triton
from tokenmill.kernels.rotary import (
    apply_rotary_reference,
    apply_rotary_triton,
    build_cos_sin_cache,
    rope_inv_freq,
)
from tokenmill.kernels.rotary_kv_write import rotary_and_cache, rotary_and_cache_reference

pytestmark = requires_triton_device
DTYPES = [torch.bfloat16, torch.float16]
TOL = 1e-2


def skip_interpreter_bf16_dot(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter mis-computes bf16 tl.dot (checked on a 16x16 product)")


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_reshape_and_cache_writes_only_given_slots(device, dtype):
    num_blocks, block_size, heads, dim = 9, 16, 3, 40
    cache = torch.full((2, num_blocks, block_size, heads, dim), float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * block_size)[:21].to(device)
    slots[5] = -1  # padding token: skipped
    key = torch.randn(21, heads, dim, device=device).to(dtype)
    value = torch.randn(21, heads, dim, device=device).to(dtype)
    expected = cache.clone()
    reshape_and_cache_reference(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    torch.testing.assert_close(cache, expected, rtol=0, atol=0, equal_nan=True)
    assert (
        torch.isnan(cache).sum()
        == torch.isnan(expected).sum()
        == 2 * (num_blocks * block_size - 20) * heads * dim
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(13, 1000), (5, 4096)])
def test_rms_norm(device, dtype, with_residual, shape):
    x = torch.randn(shape, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    residual = torch.randn(shape, device=device).to(dtype) if with_residual else None
    out = torch.full_like(x, float("nan"))
    res_out = torch.full_like(x, float("nan"))
    got = rms_norm_triton(x, weight, 1e-6, residual, out=out, residual_out=res_out)
    ref = rms_norm_reference(x.float(), weight.float(), 1e-6, None if residual is None else residual.float())
    if with_residual:
        assert got[0] is out and got[1] is res_out
        assert rel_err(out, ref[0]) <= TOL
        assert rel_err(res_out, ref[1]) <= TOL
    else:
        assert got is out
        assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(7, 2000), (3, 5, 2 * 1408)])
def test_silu_and_mul(device, dtype, shape):
    x = torch.randn(shape, device=device).to(dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)
    assert silu_and_mul_triton(x, out=out) is out
    assert rel_err(out, silu_and_mul_reference(x.float())) <= TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "rotary_dim"), [(8, 2, 128, 128), (6, 6, 64, 32)]
)
def test_rotary_in_place(device, dtype, num_heads, num_kv_heads, head_dim, rotary_dim):
    tokens = 11
    cache = build_cos_sin_cache(rope_inv_freq(rotary_dim, 10000.0), 4096).to(device)
    positions = torch.randint(0, 4096, (tokens,), device=device)
    # q as a strided view of a fused qkv output, like the model produces.
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        tokens, num_kv_heads, head_dim
    )
    q_ref, k_ref = q.float().clone(), k.float().clone()
    apply_rotary_reference(q_ref, k_ref, positions, cache)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    apply_rotary_triton(q, k, positions, cache)
    assert rel_err(q, q_ref) <= TOL
    assert rel_err(k, k_ref) <= TOL
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (6, 6, 64), (14, 2, 64)])
def test_rotary_and_cache_matches_the_separate_kernels(device, dtype, num_heads, num_kv_heads, head_dim):
    """Bit-identical to rotary + KV write run apart, within tolerance of the fp32 reference; a padding
    slot (-1) writes nothing, query is rotated in place, key is left as it was."""
    tokens, num_blocks, block_size = 13, 6, 16
    cache_table = build_cos_sin_cache(rope_inv_freq(head_dim, 500000.0), 8192).to(device)
    positions = torch.randint(0, 8192, (tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(device)
    slots[4] = -1
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    q, k, v = (t.view(tokens, -1, head_dim) for t in qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    k_before = k.clone()
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype,
                       device=device)
    q_sep, k_sep, cache_sep = q.clone(), k.clone(), cache.clone()
    apply_rotary_triton(q_sep, k_sep, positions, cache_table)
    reshape_and_cache(k_sep, v, cache_sep, slots)
    q_ref, k_ref, cache_ref = q.float(), k.float(), cache.float()
    rotary_and_cache_reference(q_ref, k_ref, v.float(), positions, cache_table, cache_ref, slots)

    rotary_and_cache(q, k, v, positions, cache_table, cache, slots)
    torch.testing.assert_close(q, q_sep, rtol=0, atol=0)
    torch.testing.assert_close(cache, cache_sep, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(k, k_before)
    assert rel_err(q, q_ref) <= TOL
    written = ~torch.isnan(cache_ref)
    assert torch.equal(written, ~torch.isnan(cache))
    assert written.sum() == 2 * (tokens - 1) * num_kv_heads * head_dim
    assert rel_err(cache[written], cache_ref[written]) <= TOL


DECODE_CASES = [
    # (seq_lens, num_heads, num_kv_heads, head_dim, block_size)
    ([1, 17, 300, 1000], 8, 2, 128, 16),
    ([64, 5, 129], 4, 4, 64, 32),
    ([40, 1, 77], 12, 2, 32, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", DECODE_CASES)
@pytest.mark.parametrize("splits", ["auto", "one", "many"])
def test_paged_decode(device, dtype, case, splits):
    skip_interpreter_bf16_dot(device, dtype)
    seq_lens, num_heads, num_kv_heads, head_dim, block_size = case
    seqs = [(n - 1, 1) for n in seq_lens]
    query, key, value, cache, meta = make_paged_batch(
        seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=len(seq_lens) + head_dim
    )
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    max_len = meta.block_tables.shape[1] * block_size
    sms = {"auto": 132, "one": 1, "many": 10_000}[splits]
    plan = plan_decode(len(seq_lens), num_kv_heads, max_len, sms, min_partition=64)
    assert (plan.num_splits == 1) == (splits == "one") or splits == "auto"
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    paged_decode(query, cache, meta.block_tables, meta.seq_lens, scale, plan=plan, out=out)
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, meta.seq_lens, scale)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_paged_decode_behind_a_wide_table_per_sequence_and_fixed_partitions(device, dtype):
    """A CUDA graph plans for max_model_len: short sequences behind that wide table are attended correctly
    whether each cuts its own length over the splits (the default) or takes the planned partition (fixed).
    Correctness only; the speed of spreading is measured in benchmarks/gpu_kernels.py --only decode_wide."""
    skip_interpreter_bf16_dot(device, dtype)
    seq_lens = [3, 200, 513]
    query, key, value, cache, meta = make_paged_batch(
        [(n - 1, 1) for n in seq_lens], 8, 2, 64, 16, dtype, device, seed=11
    )
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    wide = torch.nn.functional.pad(meta.block_tables, (0, 512 - meta.block_tables.shape[1]))  # 8192 tokens
    plan = plan_decode(len(seq_lens), 2, wide.shape[1] * 16, 16)  # 11 splits of 768 tokens
    assert plan.num_splits > 1 and plan.partition_size > plan.min_partition
    fixed = dataclasses.replace(plan, min_partition=plan.partition_size)
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, meta.seq_lens, 0.125)
    for p in (plan, fixed):
        out = torch.full_like(query, float("nan"))
        paged_decode(query, cache, wide, meta.seq_lens, 0.125, plan=p, out=out)
        assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_paged_decode_reads_a_head_major_cache_through_its_strides(device, dtype):
    """The kernel indexes the cache by strides: the same values stored head-major inside each block (a
    permuted view, as benchmarks/gpu_kernels.py --only decode_layout times) give the same attention."""
    skip_interpreter_bf16_dot(device, dtype)
    seq_lens = [5, 70, 161]
    query, key, value, cache, meta = make_paged_batch(
        [(n - 1, 1) for n in seq_lens], 8, 4, 64, 16, dtype, device, seed=21
    )
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    head_major = cache.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    torch.testing.assert_close(head_major, cache, rtol=0, atol=0, equal_nan=True)
    assert head_major.stride(2) == 64 and head_major.stride(3) == 16 * 64
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, meta.seq_lens, 0.125)
    width = meta.block_tables.shape[1] * 16
    for plan in (plan_decode(3, 4, width, 1), plan_decode(3, 4, width, 10_000, min_partition=32, block_n=32)):
        out = torch.full_like(query, float("nan"))
        paged_decode(query, head_major, meta.block_tables, meta.seq_lens, 0.125, plan=plan, out=out)
        assert rel_err(out, ref) <= TOL

@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_paged_decode_padding_rows_give_zeros(device, dtype):
    skip_interpreter_bf16_dot(device, dtype)
    query, key, value, cache, meta = make_paged_batch([(20, 1), (0, 1)], 4, 2, 64, 16, dtype, device, seed=3)
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    seq_lens = meta.seq_lens.clone()
    seq_lens[1] = 0  # a CUDA-graph padding row
    for plan in (plan_decode(2, 2, 32, 1), plan_decode(2, 2, 32, 10_000, min_partition=16, block_n=16)):
        out = torch.full_like(query, float("nan"))
        paged_decode(query, cache, meta.block_tables, seq_lens, 0.125, plan=plan, out=out)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        ref = paged_decode_reference(
            query[:1].float(), cache.float(), meta.block_tables[:1], seq_lens[:1], 0.125
        )
        assert rel_err(out[:1], ref) <= TOL


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("query_len", [2, 3, 5, 8])
@pytest.mark.parametrize("splits", ["one", "many"])
def test_paged_decode_verification_rows(device, dtype, query_len, splits):
    """1 + k new tokens per sequence (speculative verification), causal among themselves, against the fp32
    reference; sequence lengths put the new tokens across block and split boundaries, and one sequence is
    no longer than its new tokens (no context at all)."""
    skip_interpreter_bf16_dot(device, dtype)
    seq_lens = [query_len, 17, 64 + query_len, 300]
    num_heads, num_kv_heads, head_dim, block_size = 8, 2, 64, 16
    query, key, value, cache, meta = make_paged_batch(
        [(n - query_len, query_len) for n in seq_lens], num_heads, num_kv_heads, head_dim, block_size, dtype,
        device, seed=query_len,
    )
    assert meta.decode_query_len == query_len
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    max_len = meta.block_tables.shape[1] * block_size
    sms = {"one": 1, "many": 10_000}[splits]
    plan = plan_decode(len(seq_lens), num_kv_heads, max_len, sms, min_partition=32, block_n=32)
    assert (plan.num_splits == 1) == (splits == "one")
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    paged_decode(query, cache, meta.block_tables, meta.seq_lens, scale, plan=plan, out=out, query_len=query_len)
    ref = paged_decode_reference(query.float(), cache.float(), meta.block_tables, meta.seq_lens, scale, query_len)
    assert rel_err(out, ref) <= TOL
    # Each token's row equals a one-token decode of the same sequence cut at that token's position.
    seq = 2
    for j in range(query_len):
        cut = meta.seq_lens[seq : seq + 1] - (query_len - 1 - j)
        row = seq * query_len + j
        single = paged_decode_reference(query[row : row + 1].float(), cache.float(), meta.block_tables[seq : seq + 1],
                                        cut, scale)
        assert rel_err(out[row : row + 1], single) <= TOL


def test_paged_decode_rejects_a_ragged_query_count():
    query = torch.zeros(5, 4, 16)
    cache = torch.zeros(2, 4, 16, 2, 16)
    with pytest.raises(ValueError, match="query tokens per sequence"):
        paged_decode(query, cache, torch.zeros(2, 4, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1.0,
                     query_len=2)


PREFILL_CASES = [
    # (seqs as (context_len, query_len), num_heads, num_kv_heads, head_dim, block_size)
    ([(0, 1), (0, 70), (33, 50), (100, 1), (5, 130)], 8, 2, 64, 16),
    ([(0, 200), (64, 64)], 4, 4, 128, 32),
    ([(17, 3), (0, 9)], 6, 3, 16, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PREFILL_CASES)
@pytest.mark.parametrize(("block_m", "block_n"), [(64, 64), (32, 16)])
def test_prefill_attention(device, dtype, case, block_m, block_n):
    skip_interpreter_bf16_dot(device, dtype)
    seqs, num_heads, num_kv_heads, head_dim, block_size = case
    query, key, value, cache, meta = make_paged_batch(
        seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=head_dim + block_m
    )
    reshape_and_cache(key, value, cache, meta.slot_mapping)
    out = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    prefill_attention(
        query,
        cache,
        meta.query_start_loc,
        meta.seq_lens,
        meta.block_tables,
        meta.max_query_len,
        scale,
        out=out,
        block_m=block_m,
        block_n=block_n,
    )
    ref = prefill_attention_reference(
        query.float(), cache.float(), meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.block_tables, scale
    )
    assert rel_err(out, ref) <= TOL
