"""Verification with sampling follows the target distribution exactly (chi-square goodness of fit, fixed seeds).

A 4-token Markov chain stands in for the target model: p(next | last) is a fixed row of logits. A speculative
decoder proposes k drafts, verifies them and emits the accepted prefix plus one token, until 3 tokens exist; the
frequencies of the 64 possible 3-token outputs must match the chain's exact probabilities. Two verifiers:
the sampler's ordinary draws + ``accept_drafts`` (drafts from anywhere, here a point mass that is often wrong) and
``rejection_sample`` against a draft distribution q that differs from p.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from tokenmill import SamplingParams
from tokenmill.sampling.acceptance import accept_drafts
from tokenmill.sampling.sampler import Sampler, SamplingRow
from tokenmill.spec_decode.rejection import rejection_sample, rejection_sample_batch

V, LENGTH, K, START = 4, 3, 2, 0  # vocabulary, output length, drafts per verification, first context token
TARGET = torch.tensor([[1.0, 0.2, -0.5, 0.3], [0.1, 1.2, 0.4, -1.0], [-0.3, 0.5, 0.9, 0.0], [0.6, -0.2, 0.1, 0.8]])
DRAFT = torch.tensor([[0.2, 1.0, 0.1, -0.4], [1.0, 0.0, 0.3, 0.2], [0.5, 0.5, -0.5, 0.9], [-0.2, 0.7, 0.3, 0.1]])


def chi_square_p_value(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(counts) - 1))
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


def exact_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    probs = (logits / temperature).softmax(-1)
    out = torch.zeros(V**LENGTH)
    for index, seq in enumerate(itertools.product(range(V), repeat=LENGTH)):
        p, last = 1.0, START
        for token in seq:
            p *= float(probs[last, token])
            last = token
        out[index] = p
    return out


def run_chains(verify, num_samples: int) -> torch.Tensor:
    """``num_samples`` independent generations, all verified together each round (every round emits 1..k+1
    tokens per chain); returns the counts of the 64 possible first-3-token outputs."""
    outs: list[list[int]] = [[] for _ in range(num_samples)]
    while any(len(o) < LENGTH for o in outs):
        lasts = torch.tensor([o[-1] if o else START for o in outs])
        for out, emitted in zip(outs, verify(lasts), strict=True):
            out.extend(emitted)
    counts = torch.zeros(V**LENGTH)
    for out in outs:
        counts[sum(t * V ** (LENGTH - 1 - i) for i, t in enumerate(out[:LENGTH]))] += 1
    return counts


def chain_drafts(lasts: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """K drafts per chain: fixed guesses (a point mass) without a generator, else drawn from the draft chain q."""
    drafts, q_rows, prev = [], [], lasts
    for i in range(K):
        if generator is None:
            token = (prev + 1 + i) % V
        else:
            q = DRAFT[prev].softmax(-1)
            q_rows.append(q)
            token = torch.multinomial(q, 1, generator=generator).squeeze(1)
        drafts.append(token)
        prev = token
    return torch.stack(drafts, 1), (torch.stack(q_rows, 1) if q_rows else None)


def target_logits(lasts: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """[N, k + 1, V]: the target's logits after the context and after each draft prefix (a verification row)."""
    return TARGET[torch.cat([lasts[:, None], drafts], dim=1)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_point_mass_drafts_verified_by_the_samplers_draws_follow_the_target(temperature):
    sampler = Sampler(eos_token_ids=set())
    params = SamplingParams(temperature=temperature)
    torch.manual_seed(0)  # unseeded rows draw from the default generator, as in the engine

    def verify(lasts: torch.Tensor) -> list[list[int]]:
        drafts, _ = chain_drafts(lasts, None)
        logits = target_logits(lasts, drafts).reshape(-1, V)
        sampled, _ = sampler.sample(logits, [SamplingRow(params, [0], []) for _ in range(len(logits))])
        sampled = sampled.view(len(lasts), K + 1).tolist()
        return [accept_drafts(d, s) for d, s in zip(drafts.tolist(), sampled, strict=True)]

    counts = run_chains(verify, 8000)
    assert chi_square_p_value(counts, exact_probs(TARGET, temperature)) > 1e-3


def test_drafts_drawn_from_q_and_rejection_sampled_follow_the_target():
    generator = torch.Generator().manual_seed(1)
    accepted = proposed = 0

    def verify(lasts: torch.Tensor) -> list[list[int]]:
        nonlocal accepted, proposed
        drafts, q = chain_drafts(lasts, generator)
        p = target_logits(lasts, drafts).softmax(-1)
        uniform = torch.rand(len(lasts), K, generator=generator)
        noise = torch.empty_like(p).exponential_(generator=generator)
        out = rejection_sample_batch(p, drafts, q, uniform, noise).tolist()
        emitted = [accept_drafts(d, o) for d, o in zip(drafts.tolist(), out, strict=True)]
        accepted += sum(len(e) - 1 for e in emitted)
        proposed += K * len(emitted)
        return emitted

    counts = run_chains(verify, 8000)
    assert chi_square_p_value(counts, exact_probs(TARGET, 1.0)) > 1e-3
    assert 0 < accepted < proposed  # both branches ran: acceptances and residual draws


def test_the_test_detects_a_wrong_distribution():
    """The same test rejects a verifier that emits the drafts unchecked (the draft's distribution)."""
    generator = torch.Generator().manual_seed(2)

    def verify(lasts: torch.Tensor) -> list[list[int]]:
        drafts, _ = chain_drafts(lasts, generator)
        return drafts.tolist()

    counts = run_chains(verify, 8000)
    assert chi_square_p_value(counts, exact_probs(TARGET, 1.0)) < 1e-6


def test_rejection_sample_edge_cases():
    p = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    assert rejection_sample(p, torch.tensor([1]), q).tolist() == [1, 0]  # p == q: accepted, then the bonus
    wrong = torch.tensor([[0.0, 0.0, 1.0]])
    out = rejection_sample(p, torch.tensor([2]), wrong).tolist()
    assert out[0] == 1  # p(2) = 0: always rejected; the residual max(0, p - q) is all on token 1
    assert accept_drafts([2], out) == [1]
    assert rejection_sample(p[1:], torch.tensor([], dtype=torch.long), q[:0]).tolist() == [0]
    with pytest.raises(ValueError, match="2 drafts need"):
        rejection_sample(p, torch.tensor([1, 2]), q)
