"""The decoder layers' CPU code: the rotary tables a forward pass shares across layers, and RMSNorm, equal bit for
bit to the plain statements of the formulas on fresh random inputs (bf16, fp16, fp32)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model.layers import RotaryEmbedding, rms_norm


def _plain_rotary(q, k, positions, cos_sin_cache):
    cos, sin = cos_sin_cache.index_select(0, positions).to(q.dtype).chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    return rotate(q), rotate(k)


def _plain_rms_norm(x, weight, eps, residual):
    x = x + residual
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype), x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rotary_tables_are_shared_across_layers_and_renewed_when_positions_change(dtype):
    rotary = RotaryEmbedding(64, 10000.0, None, 2048)
    gen = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 2048, (5,), generator=gen)
    for step, pos in enumerate([positions, positions.clone(), positions + 1, positions[:3]]):
        for _layer in range(2):  # the second layer reuses the first one's tables
            q = torch.randn(pos.shape[0], 9, 64, generator=gen).to(dtype)
            k = torch.randn(pos.shape[0], 3, 64, generator=gen).to(dtype)
            got, want = rotary(q, k, pos), _plain_rotary(q, k, pos, rotary.cos_sin_cache)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), step
    positions.add_(7)  # the same tensor changed in place: compared by value, so the tables follow
    q, k = torch.randn(5, 9, 64).to(dtype), torch.randn(5, 3, 64).to(dtype)
    assert torch.equal(rotary(q, k, positions)[0], _plain_rotary(q, k, positions, rotary.cos_sin_cache)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_with_residual_equals_the_plain_formula(dtype):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(7, 576, generator=gen) * 3).to(dtype)
    residual = torch.randn(7, 576, generator=gen).to(dtype)
    weight = torch.randn(576, generator=gen).to(dtype)
    got, want = rms_norm(x, weight, 1e-5, residual), _plain_rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotary_of_q_and_k_sliced_from_one_qkv_output_rotates_them_together_bit_for_bit(dtype):
    rotary = RotaryEmbedding(64, 10000.0, None, 2048)
    gen = torch.Generator().manual_seed(9)
    positions = torch.randint(0, 2048, (4,), generator=gen)
    qkv = torch.randn(4, (9 + 3 + 3) * 64, generator=gen).to(dtype)
    q, k, _ = qkv.split([9 * 64, 3 * 64, 3 * 64], dim=-1)
    q, k = q.view(4, 9, 64), k.view(4, 3, 64)
    got, want = rotary(q, k, positions), _plain_rotary(q, k, positions, rotary.cos_sin_cache)
    assert got[0].shape == q.shape and got[1].shape == k.shape
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].untyped_storage().data_ptr() == got[1].untyped_storage().data_ptr()  # one rotation made both
    assert torch.equal(qkv[:, : 9 * 64].view(4, 9, 64), q)  # the projection output is left as it was
