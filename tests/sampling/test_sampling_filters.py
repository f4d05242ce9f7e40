"""Top-k, top-p, min-p, temperature and greedy on crafted logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_row

from tokenmill.sampling import Sampler
from tokenmill.sampling.filters import apply_min_p, apply_top_k_top_p
from tokenmill.sampling.sampler import filtered_logits


def log_probs(probs: list[float], device) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float32, device=device)


def kept(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def test_top_k_keeps_exactly_k_most_likely(device):
    torch.manual_seed(0)
    logits = torch.randn(3, 100, device=device)
    original = logits.clone()
    apply_top_k_top_p(logits, [5, 1, 99], [1.0, 1.0, 1.0])
    for row, k in zip(range(3), (5, 1, 99), strict=True):
        expected = set(original[row].topk(k).indices.tolist())
        assert kept(logits[row]) == expected
        finite = torch.isfinite(logits[row])
        assert torch.equal(logits[row][finite], original[row][finite])


def test_top_k_with_ties_still_keeps_exactly_k(device):
    logits = torch.zeros(1, 10, device=device)
    apply_top_k_top_p(logits, [3], [1.0])
    assert len(kept(logits[0])) == 3


def test_top_k_disabled_or_at_least_vocab_is_a_no_op(device):
    logits = torch.randn(3, 8, device=device)
    original = logits.clone()
    apply_top_k_top_p(logits, [-1, 0, 8], [1.0, 1.0, 1.0])
    assert torch.equal(logits, original)


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [
        (0.5, {0}),  # the first token alone has mass exactly 0.5
        (0.49, {0}),
        (0.51, {0, 1}),
        (0.75, {0, 1}),  # 0.5 + 0.25 reaches 0.75 exactly: no third token
        (0.76, {0, 1, 2}),
        (0.875, {0, 1, 2}),
        (0.9, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3, 4}),
        (1e-9, {0}),  # the most likely token always survives
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(device, top_p, expected):
    logits = log_probs([0.5, 0.25, 0.125, 0.075, 0.05], device).unsqueeze(0)
    apply_top_k_top_p(logits, [-1], [top_p])
    assert kept(logits[0]) == expected


@pytest.mark.parametrize(("top_p", "expected"), [(0.8, {3, 0}), (0.7, {3, 0}), (0.81, {3, 0, 2}), (0.3, {3})])
def test_top_p_boundary_with_inexact_fractions(device, top_p, expected):
    # Ids in shuffled order of probability (3: 0.5, 0: 0.3, 2: 0.2, 1: ~0): the filter goes by probability.
    logits = log_probs([0.3, 1e-12, 0.2, 0.5], device).unsqueeze(0)
    apply_top_k_top_p(logits, [-1], [top_p])
    assert kept(logits[0]) == expected


def test_top_p_applies_to_the_top_k_renormalised_distribution(device):
    # After top-2 the distribution is 4/7, 3/7: top_p 0.5 keeps one token, 0.6 keeps both.
    logits = log_probs([0.4, 0.3, 0.2, 0.1], device).repeat(2, 1)
    apply_top_k_top_p(logits, [2, 2], [0.5, 0.6])
    assert kept(logits[0]) == {0}
    assert kept(logits[1]) == {0, 1}


def test_rows_without_filters_are_untouched_in_a_mixed_batch(device):
    torch.manual_seed(1)
    logits = torch.randn(4, 50, device=device)
    original = logits.clone()
    apply_top_k_top_p(logits, [-1, 3, -1, -1], [1.0, 1.0, 0.5, 1.0])
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[3], original[3])
    assert len(kept(logits[1])) == 3
    assert kept(logits[2]) < set(range(50))


@pytest.mark.parametrize(
    ("min_p", "expected"), [(0.0, {0, 1, 2, 3}), (0.24, {0, 1, 2}), (0.26, {0, 1}), (1.0, {0})]
)
def test_min_p_drops_tokens_below_min_p_times_max(device, min_p, expected):
    logits = log_probs([0.5, 0.25, 0.125, 0.125], device).unsqueeze(0)
    logits[0, 3] = math.log(0.0625)  # mass need not sum to 1: softmax renormalises
    apply_min_p(logits, [min_p])
    assert kept(logits[0]) == expected


def test_greedy_is_argmax_whatever_the_other_knobs(device):
    torch.manual_seed(2)
    logits = torch.randn(5, 64, device=device)
    rows = [make_row(device, temperature=0.0, top_k=3, top_p=0.1, min_p=0.5, seed=i) for i in range(5)]
    out = Sampler(eos_token_ids=set())(logits, rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def entropy(logits: torch.Tensor) -> float:
    probs = logits.softmax(dim=-1)
    return float(-(probs * probs.clamp_min(1e-30).log()).sum())


def test_temperature_divides_logits_and_orders_entropy(device):
    torch.manual_seed(3)
    logits = torch.randn(1, 32, device=device)
    entropies = []
    for temperature in (0.25, 0.5, 1.0, 2.0, 4.0):
        scaled = filtered_logits(logits, [make_row(device, temperature=temperature)])
        torch.testing.assert_close(scaled, logits / temperature)
        entropies.append(entropy(scaled))
    assert entropies == sorted(entropies)
    assert entropies[-1] < math.log(32) and entropies[0] > 0


def test_temperature_sampling_frequencies_match_scaled_softmax(device):
    torch.manual_seed(4)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=device)
    n = 20000
    rows = [make_row(device, temperature=2.0) for _ in range(n)]
    tokens = torch.tensor(Sampler(set())(logits.expand(n, 4), rows).token_ids)
    freq = torch.bincount(tokens, minlength=4).double() / n
    expected = (logits[0].double().cpu() / 2.0).softmax(dim=-1)
    assert torch.allclose(freq, expected, atol=0.02)


def test_sampling_never_picks_filtered_tokens(device):
    torch.manual_seed(5)
    logits = torch.randn(1, 40, device=device)
    n = 3000
    rows = [make_row(device, top_k=4) for _ in range(n // 2)] + [
        make_row(device, top_p=0.3) for _ in range(n // 2)
    ]
    tokens = Sampler(set())(logits.expand(n, 40), rows).token_ids
    top4 = set(logits[0].topk(4).indices.tolist())
    assert set(tokens[: n // 2]) <= top4
    filtered = logits.clone()
    apply_top_k_top_p(filtered, [-1], [0.3])
    assert set(tokens[n // 2 :]) <= kept(filtered[0])


def reference_top_k_top_p(row: torch.Tensor, k: int, p: float) -> set[int]:
    """One row straight from the definitions, in float64."""
    probs = row.double().cpu().softmax(dim=-1)
    order = probs.argsort(descending=True).tolist()
    if 0 < k < len(order):
        order = order[:k]
    mass = probs[order].sum()
    keep, total = [], 0.0
    for token in order:
        keep.append(token)
        total += float(probs[token]) / float(mass)
        if total >= p:
            break
    return set(keep)


@pytest.mark.parametrize("vocab", [300, 3000])
def test_filters_match_the_reference_on_both_sort_paths(device, vocab):
    # A row without top_k (or with one above PARTIAL_SORT_MAX_K) forces the full sort; small ks take topk.
    gen = torch.Generator().manual_seed(vocab)
    logits = (2 * torch.randn(6, vocab, generator=gen)).to(device)
    top_k = [5, -1, 50, 2000 if vocab > 2000 else 200, 1, 17]
    top_p = [1.0, 0.6, 0.9, 0.95, 0.5, 0.3]
    filtered = logits.clone()
    apply_top_k_top_p(filtered, top_k, top_p)
    for i in range(6):
        assert kept(filtered[i]) == reference_top_k_top_p(logits[i], top_k[i], top_p[i])
    small_k, some_p = [5, 50, 17, 1, 30, 8], [0.6, 0.9, 0.95, 0.5, 0.3, 1.0]  # partial path with top-p
    partial = logits.clone()
    apply_top_k_top_p(partial, small_k, some_p)
    for i in range(6):
        assert kept(partial[i]) == reference_top_k_top_p(logits[i], small_k[i], some_p[i])
    only_k = logits.clone()
    apply_top_k_top_p(only_k, [5, 9, 40, 1, 2, 3], [1.0] * 6)  # all small: partial path
    for i, k in enumerate([5, 9, 40, 1, 2, 3]):
        assert kept(only_k[i]) == set(logits[i].topk(k).indices.tolist())
