"""Seeded sampling reproduces exactly and independently of the batch; frequencies follow softmax."""

from __future__ import annotations

import torch
from conftest import make_row

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.sampling import Sampler, SamplingRow, make_generator
from tokenmill.sampling_params import SamplingParams

VOCAB = 50


def fixed_logits(step: int, rows: int, device) -> torch.Tensor:
    """Flat-ish logits that differ per step, the same for every row (so only the noise decides)."""
    g = torch.Generator().manual_seed(1000 + step)
    return (0.5 * torch.randn(1, VOCAB, generator=g)).expand(rows, VOCAB).contiguous().to(device)


def run_seeded(device, seed: int, neighbours: list[SamplingRow], steps: int = 20, **params) -> list[int]:
    """Sample ``steps`` tokens for one seeded request placed in the middle of ``neighbours``."""
    sampler = Sampler(set())
    params = SamplingParams(seed=seed, **params)
    generator = make_generator(seed, device)
    tokens: list[int] = []
    half = len(neighbours) // 2
    for step in range(steps):
        row = SamplingRow(params, [1, 2, 3], list(tokens), generator)
        batch = neighbours[:half] + [row] + neighbours[half:]
        out = sampler(fixed_logits(step, len(batch), device), batch)
        tokens.append(out.token_ids[half])
    return tokens


def test_make_generator_none_without_seed(device):
    assert make_generator(None, device) is None
    assert make_generator(3, device).device.type == device.type


def test_same_seed_reproduces_across_calls(device):
    assert run_seeded(device, 42, []) == run_seeded(device, 42, [])


def test_seeded_row_independent_of_batch_composition(device):
    alone = run_seeded(device, 7, [], top_k=20, top_p=0.9)
    neighbours = [
        make_row(device),
        make_row(device, seed=99, temperature=0.7),
        make_row(device, temperature=0.0),
        make_row(device, top_k=3, min_p=0.1, output=[1, 1], frequency_penalty=1.0),
        make_row(device, seed=123, top_p=0.5, logprobs=3),
    ]
    assert run_seeded(device, 7, neighbours, top_k=20, top_p=0.9) == alone


def test_different_seeds_give_different_tokens(device):
    runs = {tuple(run_seeded(device, seed, [])) for seed in range(4)}
    assert len(runs) == 4


def test_unseeded_frequencies_match_softmax(device):
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]], device=device)
    n = 20000
    tokens = Sampler(set())(logits.expand(n, 6), [make_row(device) for _ in range(n)]).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=6).double() / n
    # Standard error is at most 0.0036 at n = 20000; 0.02 is over five of them.
    assert torch.allclose(freq, logits[0].double().cpu().softmax(dim=-1), atol=0.02)


def test_seeded_generator_frequencies_match_softmax(device):
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]], device=device)
    sampler = Sampler(set())
    generator = make_generator(2024, device)
    params = SamplingParams(seed=2024)
    n = 2000
    tokens = [sampler(logits, [SamplingRow(params, [], [], generator)]).token_ids[0] for _ in range(n)]
    freq = torch.bincount(torch.tensor(tokens), minlength=4).double() / n
    assert torch.allclose(freq, logits[0].double().cpu().softmax(dim=-1), atol=0.04)


def test_top_k_frequencies_match_renormalised_softmax(device):
    torch.manual_seed(1)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]], device=device)
    n = 20000
    tokens = Sampler(set())(logits.expand(n, 5), [make_row(device, top_k=3) for _ in range(n)]).token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=5).double() / n
    expected = torch.cat([logits[0, :3].double().cpu().softmax(dim=-1), torch.zeros(2, dtype=torch.float64)])
    assert torch.allclose(freq, expected, atol=0.02)


def test_fused_kernel_takes_only_unseeded_unfiltered_rows(device):
    from tokenmill.sampling.sampler import fused_sampling_applies

    logits = torch.randn(2, 50, device=device)
    plain = [make_row(device, temperature=0.7), make_row(device)]
    on_gpu = device.type == "cuda" and HAS_TRITON
    assert fused_sampling_applies(logits, plain) == on_gpu
    for knobs in ({"seed": 3}, {"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}):
        assert not fused_sampling_applies(logits, [plain[0], make_row(device, **knobs)])
    assert fused_sampling_applies(logits, [make_row(device, top_k=50)]) == on_gpu  # k >= vocab filters nothing


def test_half_precision_logits_sample_as_their_fp32_upcast(device):
    """The model hands the sampler bf16 logits: greedy, seeded, top-k/top-p and penalised rows pick the same
    tokens as from the exact fp32 upcast (and logprobs are computed in fp32)."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 300, generator=gen) * 3).to(torch.bfloat16).to(device)
    specs = [dict(temperature=0.0), dict(temperature=0.8, seed=7), dict(temperature=1.0, top_k=20, seed=8),
             dict(temperature=0.7, top_p=0.9, seed=9), dict(temperature=0.0, repetition_penalty=1.3, logprobs=3)]
    sampler = Sampler(eos_token_ids={0})

    def sample(x: torch.Tensor):
        rows = [make_row(device, prompt=[1, 2, 3], output=[4], **spec) for spec in specs]
        return sampler.sample(x, rows)

    ids_bf16, logprobs_bf16 = sample(logits)
    ids_fp32, logprobs_fp32 = sample(logits.float())
    assert torch.equal(ids_bf16, ids_fp32)
    assert logprobs_bf16 == logprobs_fp32
