"""The fused Gumbel-max sampler: exact against a float64 reference given the same uniforms, and its own
Philox draws follow softmax(logits / T)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from tokenmill.kernels.gumbel_sample import BLOCK, gumbel_argmax_reference, gumbel_sample

pytestmark = requires_cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 5, 300])
@pytest.mark.parametrize("vocab", [BLOCK - 3, 4 * BLOCK, 151_936])
def test_given_noise_matches_the_float64_reference(dtype, rows, vocab):
    gen = torch.Generator(device="cuda").manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 4).to(dtype)
    temperature = torch.rand(rows, device="cuda", generator=gen) * 1.5 + 0.05
    uniform = torch.rand(rows, vocab, device="cuda", generator=gen).clamp_min(1e-12)
    out = gumbel_sample(logits, temperature, seed=0, uniform=uniform)
    ref = gumbel_argmax_reference(logits, temperature, uniform)
    assert out.dtype == torch.long and out.shape == (rows,)
    if not torch.equal(out, ref):
        # Only a near-tie between the top two scores may flip in float32.
        scores = logits.double() / temperature.double()[:, None] - torch.log(-torch.log(uniform.double()))
        rows_off = (out != ref).nonzero().flatten()
        gap = (scores[rows_off, ref[rows_off]] - scores[rows_off, out[rows_off]]).abs()
        assert (gap < 1e-4 * scores[rows_off].abs().amax(dim=1)).all()


def test_draws_follow_the_tempered_softmax_and_skip_masked_tokens():
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, float("-inf"), 2.0], device="cuda")
    n = 40_000
    for t in (0.5, 1.0, 2.0):
        per_row = torch.full((n,), t, device="cuda")
        for temperature in (per_row, t):  # a tensor per row, or one float for the batch
            ids = gumbel_sample(base.expand(n, 6), temperature, seed=1234 + int(10 * t))
            freq = torch.bincount(ids, minlength=6).double().cpu() / n
            expected = (base.double().cpu() / t).softmax(dim=-1)
            assert freq[4] == 0  # -inf is never drawn
            # Standard error <= 0.0025 at n = 40000; 0.012 is about five of them.
            assert torch.allclose(freq, expected, atol=0.012), (t, freq, expected)


def test_a_dominant_token_at_the_end_of_a_large_vocabulary_wins():
    logits = torch.randn(3, 151_936, device="cuda")
    logits[:, -1] = 80.0  # past every split boundary
    ids = gumbel_sample(logits, torch.ones(3, device="cuda"), seed=7)
    assert ids.tolist() == [151_935] * 3


def test_seed_repeats_and_changes_draws():
    logits = torch.randn(64, 5000, device="cuda")
    temperature = torch.ones(64, device="cuda")
    a = gumbel_sample(logits, temperature, seed=11)
    assert torch.equal(a, gumbel_sample(logits, temperature, seed=11))
    assert not torch.equal(a, gumbel_sample(logits, temperature, seed=12))


def test_rejects_bad_shapes():
    logits = torch.randn(4, 100, device="cuda")
    with pytest.raises(ValueError, match="temperature"):
        gumbel_sample(logits, torch.ones(3, device="cuda"), seed=0)
    with pytest.raises(ValueError, match="> 0"):
        gumbel_sample(logits, 0.0, seed=0)
    with pytest.raises(ValueError, match="contiguous"):
        gumbel_sample(logits.t(), torch.ones(100, device="cuda"), seed=0)
