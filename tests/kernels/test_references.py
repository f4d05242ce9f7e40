"""The pure-torch kernel references against naive math on CPU, the decode planner, and ops dispatch.

These run everywhere (no GPU, no triton); the Triton kernels are then tested against these references.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_paged_batch, rel_err

from tokenmill.attention.torch_backend import TorchAttentionBackend, paged_attention_reference, write_kv_cache
from tokenmill.kernels import apply_rotary, rms_norm, silu_and_mul
from tokenmill.kernels._triton import next_power_of_2
from tokenmill.kernels.activation import silu_and_mul_reference
from tokenmill.kernels.kv_cache_write import reshape_and_cache_reference
from tokenmill.kernels.paged_attention import count_leading_decodes, paged_decode_reference, plan_decode
from tokenmill.kernels.prefill_attention import prefill_attention_reference
from tokenmill.kernels.rms_norm import rms_norm_reference
from tokenmill.kernels.rotary import apply_rotary_reference, build_cos_sin_cache, rope_inv_freq


def test_rms_norm_reference_matches_formula():
    x, res, w = torch.randn(5, 48), torch.randn(5, 48), torch.randn(48)
    out = rms_norm_reference(x, w, 1e-6)
    manual = torch.stack([w * row / math.sqrt(float((row * row).mean()) + 1e-6) for row in x])
    torch.testing.assert_close(out, manual)
    out2, summed = rms_norm_reference(x, w, 1e-6, res)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(out2, rms_norm_reference(x + res, w, 1e-6))


def test_silu_and_mul_reference_matches_formula():
    x = torch.randn(3, 4, 20)
    gate, up = x[..., :10], x[..., 10:]
    torch.testing.assert_close(silu_and_mul_reference(x), gate * torch.sigmoid(gate) * up)


def test_rotary_reference_matches_hf_rotate_half():
    tokens, heads, dim = 6, 3, 16
    positions = torch.tensor([0, 1, 5, 9, 2, 30])
    cache = build_cos_sin_cache(rope_inv_freq(dim, 10000.0), 64)
    q, k = torch.randn(tokens, heads, dim), torch.randn(tokens, 1, dim)
    # HF Llama: emb = cat(freqs, freqs); x * cos + rotate_half(x) * sin.
    freqs = positions[:, None].float() * rope_inv_freq(dim, 10000.0)[None, :]
    cos = torch.cat((freqs, freqs), -1).cos()[:, None, :]
    sin = torch.cat((freqs, freqs), -1).sin()[:, None, :]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1)

    q_hf, k_hf = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    q2d = q.clone().view(tokens, heads * dim)  # the 2-D [T, H*D] form rotates the same way
    apply_rotary_reference(q2d, k, positions, cache)
    torch.testing.assert_close(q2d.view(tokens, heads, dim), q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_hf, atol=1e-5, rtol=1e-5)


def test_partial_rotary_leaves_tail_channels():
    cache = build_cos_sin_cache(rope_inv_freq(8, 10000.0), 16)
    q, k = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    q0, k0 = q.clone(), k.clone()
    apply_rotary_reference(q, k, torch.arange(4), cache)
    assert torch.equal(q[..., 8:], q0[..., 8:]) and torch.equal(k[..., 8:], k0[..., 8:])
    assert torch.equal(q[0], q0[0])  # position 0 is the identity rotation
    assert not torch.allclose(q[1:, :, :8], q0[1:, :, :8])


def test_reshape_and_cache_reference_skips_padding_slots():
    cache = torch.zeros(2, 4, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    reshape_and_cache_reference(key, value, cache, torch.tensor([5, -1, 14]))
    flat = cache.view(2, 16, 2, 8)
    assert torch.equal(flat[0, 5], key[0]) and torch.equal(flat[1, 14], value[2])
    assert int((flat != 0).sum()) == 2 * 2 * 2 * 8  # K and V, two slots, 2 heads x 8 dims
    expected = torch.zeros_like(cache)
    write_kv_cache(key[[0, 2]], value[[0, 2]], expected, torch.tensor([5, 14]))
    assert torch.equal(cache, expected)


def test_decode_reference_matches_sdpa_backend_reference():
    query, key, value, cache, meta = make_paged_batch(
        [(0, 1), (20, 1), (47, 1)], 6, 2, 16, 8, torch.float32, "cpu", seed=1
    )
    write_kv_cache(key, value, cache, meta.slot_mapping)
    ours = paged_decode_reference(query, cache, meta.block_tables, meta.seq_lens, 0.3)
    theirs = paged_attention_reference(query, cache, meta, 0.3)
    assert rel_err(ours, theirs) < 1e-5


def test_prefill_reference_matches_sdpa_backend_reference():
    seqs = [(0, 5), (9, 7), (16, 1), (3, 12)]
    query, key, value, cache, meta = make_paged_batch(seqs, 4, 2, 16, 4, torch.float32, "cpu", seed=2)
    theirs = TorchAttentionBackend().forward(query, key, value, cache, meta, 0.25)
    ours = prefill_attention_reference(
        query, cache, meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.block_tables, 0.25
    )
    assert rel_err(ours, theirs) < 1e-5


def test_prefill_reference_first_token_attends_only_itself():
    query, key, value, cache, meta = make_paged_batch([(0, 4)], 2, 1, 8, 4, torch.float32, "cpu", seed=3)
    write_kv_cache(key, value, cache, meta.slot_mapping)
    out = prefill_attention_reference(
        query, cache, meta.query_start_loc_cpu, meta.seq_lens_cpu, meta.block_tables, 1.0
    )
    torch.testing.assert_close(out[0], value[0].expand(2, 8))
    scores = torch.einsum("hd,td->ht", query[1], key[:2, 0])
    torch.testing.assert_close(out[1], F.softmax(scores, -1) @ value[:2, 0])


@pytest.mark.parametrize("num_seqs", [1, 3, 8, 64, 256])
@pytest.mark.parametrize("max_len", [16, 1000, 8192, 131072])
def test_plan_decode_covers_every_key_once(num_seqs, max_len):
    plan = plan_decode(num_seqs, 8, max_len, 132)
    assert plan.partition_size % plan.block_n == 0
    assert plan.num_splits * plan.partition_size >= max_len  # every key has a split
    assert (plan.num_splits - 1) * plan.partition_size < max_len  # and no split is empty by construction
    assert plan.min_partition % plan.block_n == 0 and plan.min_partition <= plan.partition_size
    assert 1 <= plan.num_splits <= 64


def test_plan_decode_splits_only_when_sms_would_idle():
    assert plan_decode(256, 8, 4096, 132).num_splits == 1  # 2048 programs already fill 132 SMs
    assert plan_decode(1, 8, 8192, 132).num_splits > 8  # 8 programs alone would leave 124 SMs idle
    assert plan_decode(1, 8, 100, 132, min_partition=256).num_splits == 1  # too short to be worth a split
    assert plan_decode(17, 8, 8192, 132).num_splits == 1  # 136 programs: one per SM already


def test_plan_decode_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match="num_seqs=0"):
        plan_decode(0, 8, 128, 132)


def test_count_leading_decodes():
    assert count_leading_decodes([0, 1, 2, 3]) == 3  # all decode
    assert count_leading_decodes([0, 1, 2, 10, 11]) == 2  # a prefill after two decodes stops the count
    assert count_leading_decodes([0, 7, 8]) == 0
    assert count_leading_decodes([0]) == 0


def test_next_power_of_2():
    assert [next_power_of_2(n) for n in (1, 2, 3, 16, 17, 100)] == [1, 2, 4, 16, 32, 128]


def test_ops_use_references_on_cpu():
    x, w, res = torch.randn(4, 32), torch.randn(32), torch.randn(4, 32)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    out, summed = rms_norm(x, w, 1e-5, residual=res)
    torch.testing.assert_close(summed, x + res)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x))
    cache = build_cos_sin_cache(rope_inv_freq(8, 10000.0), 16)
    q, k = torch.randn(4, 4, 8), torch.randn(4, 4, 8)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_reference(q_ref, k_ref, torch.arange(4), cache)
    q_out, k_out = apply_rotary(q, k, torch.arange(4), cache)
    assert q_out is q and torch.equal(q, q_ref) and torch.equal(k, k_ref)
