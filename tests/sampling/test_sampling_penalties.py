"""Repetition, presence and frequency penalties and min_tokens, checked against hand-computed logits."""

from __future__ import annotations

from array import array

import pytest
import torch
from conftest import make_row

from tokenmill.sampling import Sampler
from tokenmill.sampling.penalties import apply_min_tokens, apply_penalties, flat_positions

NEG_INF = float("-inf")


def test_flat_positions_index_the_flattened_logits(device):
    positions, rows = flat_positions([[1, 1, 3], [], [0]], [2, 0, 1], 4, device)
    assert positions.tolist() == [2 * 4 + 1, 2 * 4 + 1, 2 * 4 + 3, 1 * 4 + 0]
    assert rows.tolist() == [2, 2, 2, 1]
    empty, empty_rows = flat_positions([[], []], [0, 1], 4, device)
    assert empty.numel() == 0 and empty_rows.numel() == 0


def test_repetition_penalty_divides_positive_and_multiplies_negative(device):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]], device=device)
    # Prompt and output both count; token 2 (0.5) and 4 (-2.0) never appear.
    apply_penalties(logits, [make_row(device, prompt=[0, 0], output=[1, 3], repetition_penalty=2.0)])
    assert logits.tolist() == [[1.0, -2.0, 0.5, 1.5, -2.0]]


def test_presence_and_frequency_penalties_use_output_counts_only(device):
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]], device=device)
    row = make_row(device, prompt=[3, 3], output=[1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [row])
    # token 1: 1 - 0.5 - 2 * 0.25 = 0.0; token 2: 1 - 0.5 - 0.25 = 0.25; prompt-only token 3 is untouched.
    assert logits.tolist() == [[1.0, 0.0, 0.25, 1.0]]


def test_negative_penalties_reward_repeats(device):
    logits = torch.zeros(1, 3, device=device)
    apply_penalties(logits, [make_row(device, output=[2, 2], presence_penalty=-1.0, frequency_penalty=-0.5)])
    assert logits.tolist() == [[0.0, 0.0, 2.0]]


def test_repetition_comes_before_presence_and_frequency(device):
    logits = torch.tensor([[4.0, -4.0]], device=device)
    row = make_row(device, output=[0, 1], repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0)
    apply_penalties(logits, [row])
    assert logits.tolist() == [[4.0 / 2 - 2.0, -4.0 * 2 - 2.0]]


def test_rows_without_penalties_untouched_and_rows_of_different_lengths(device):
    torch.manual_seed(0)
    logits = torch.randn(3, 6, device=device)
    expected = logits.clone()
    rows = [
        make_row(device, prompt=[0], output=[5, 5, 5, 1]),
        make_row(device, prompt=[2], output=[4], frequency_penalty=1.0),
        make_row(device, prompt=[0, 1, 2, 3], output=[], repetition_penalty=1.5),
    ]
    apply_penalties(logits, rows)
    expected[1, 4] -= 1.0
    for token in (0, 1, 2, 3):
        value = expected[2, token]
        expected[2, token] = value / 1.5 if value > 0 else value * 1.5
    torch.testing.assert_close(logits, expected)


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(device):
    logits = torch.zeros(3, 8, device=device)
    rows = [
        make_row(device, output=[5], min_tokens=2, stop_token_ids=[6]),
        make_row(device, output=[5, 5], min_tokens=2, stop_token_ids=[6]),  # reached: untouched
        make_row(device, output=[], min_tokens=1, ignore_eos=True),  # EOS masked even with ignore_eos
    ]
    apply_min_tokens(logits, rows, eos_token_ids={7, 100})  # an EOS id beyond the vocab is ignored
    assert logits[0].tolist() == [0, 0, 0, 0, 0, 0, NEG_INF, NEG_INF]
    assert logits[1].tolist() == [0.0] * 8
    assert logits[2].tolist() == [0, 0, 0, 0, 0, 0, 0, NEG_INF]


def test_sampler_blocks_eos_until_min_tokens(device):
    eos, stop = 3, 2
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0]], device=device)  # EOS is by far the most likely
    sampler = Sampler(eos_token_ids={eos})
    output: list[int] = []
    for _ in range(4):
        row = make_row(device, output=output, min_tokens=3, stop_token_ids=[stop], temperature=0.0)
        output.append(sampler(logits, [row]).token_ids[0])
    assert output == [1, 1, 1, eos]
    seeded = []
    for _ in range(3):
        row = make_row(device, output=seeded, min_tokens=3, stop_token_ids=[stop], seed=len(seeded))
        seeded.append(sampler(logits, [row]).token_ids[0])
    assert eos not in seeded and stop not in seeded


def test_writable_logits_are_masked_in_place_unless_logprobs_need_them(device):
    eos = 3
    sampler = Sampler(eos_token_ids={eos})
    base = torch.tensor([[0.0, 1.0, 5.0, 9.0], [9.0, 1.0, 0.0, 8.0]], device=device)
    rows = [make_row(device, output=[], min_tokens=2, temperature=0.0) for _ in range(2)]
    kept = base.clone()
    ids, _ = sampler.sample(kept, rows)  # default: the caller's logits stay as they were
    assert ids.tolist() == [2, 0] and torch.equal(kept, base)
    scratch = base.clone()
    ids, _ = sampler.sample(scratch, rows, logits_writable=True)
    assert ids.tolist() == [2, 0] and scratch[:, eos].tolist() == [NEG_INF, NEG_INF]
    with_logprobs = [make_row(device, output=[], min_tokens=2, temperature=0.0, logprobs=1) for _ in range(2)]
    scratch = base.clone()
    ids, logprobs = sampler.sample(scratch, with_logprobs, logits_writable=True)
    assert torch.equal(scratch, base)  # logprobs read the raw values, so the processors got a copy
    assert ids.tolist() == [2, 0] and all(lp is not None for lp in logprobs)


def test_sampler_penalty_changes_the_greedy_choice(device):
    logits = torch.tensor([[2.0, 1.9, 0.0]], device=device)
    sampler = Sampler(set())
    assert sampler(logits, [make_row(device, temperature=0.0)]).token_ids == [0]
    assert sampler(
        logits, [make_row(device, output=[0], temperature=0.0, presence_penalty=0.2)]
    ).token_ids == [1]
    assert sampler(
        logits, [make_row(device, prompt=[0], temperature=0.0, repetition_penalty=1.1)]
    ).token_ids == [1]


def test_sampler_leaves_the_callers_logits_untouched(device):
    torch.manual_seed(6)
    logits = torch.randn(4, 20, device=device)
    original = logits.clone()
    rows = [
        make_row(device, output=[1, 2], repetition_penalty=1.5, top_k=3),
        make_row(device, min_tokens=2, top_p=0.5),
        make_row(device, temperature=0.0),
        make_row(device, min_p=0.2, seed=1),
    ]
    Sampler(eos_token_ids={0})(logits, rows)
    Sampler(eos_token_ids={0})(logits[2:], rows[2:])  # no history processors: the no-copy path
    assert torch.equal(logits, original)


def reference_penalties(logits: torch.Tensor, rows) -> torch.Tensor:
    """Row by row, token by token, straight from the definitions."""
    out = logits.clone().cpu()
    for i, row in enumerate(rows):
        p = row.params
        for token in set(row.prompt_token_ids) | set(row.output_token_ids):
            value = float(out[i, token])
            out[i, token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
        for token in set(row.output_token_ids):
            count = row.output_token_ids.count(token)
            out[i, token] -= p.presence_penalty + p.frequency_penalty * count
    return out


@pytest.mark.parametrize("history", [list, lambda ids: array("q", ids)], ids=["list", "array"])
def test_penalties_match_the_reference_on_random_batches(device, history):
    gen = torch.Generator().manual_seed(7)
    vocab = 40
    for _ in range(5):
        batch = int(torch.randint(1, 6, (1,), generator=gen))
        logits = torch.randn(batch, vocab, generator=gen).to(device)
        rows = []
        for _ in range(batch):
            knobs = torch.rand(3, generator=gen).tolist()
            rows.append(
                make_row(
                    device,
                    prompt=torch.randint(
                        0, vocab, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen
                    ).tolist(),
                    output=torch.randint(
                        0, vocab, (int(torch.randint(0, 12, (1,), generator=gen)),), generator=gen
                    ).tolist(),
                    repetition_penalty=1.0 if knobs[0] < 0.3 else 0.5 + 2 * knobs[0],
                    presence_penalty=0.0 if knobs[1] < 0.3 else 4 * knobs[1] - 2,
                    frequency_penalty=0.0 if knobs[2] < 0.3 else 4 * knobs[2] - 2,
                )
            )
        for row in rows:
            row.prompt_token_ids = history(row.prompt_token_ids)
            row.output_token_ids = history(row.output_token_ids)
        expected = reference_penalties(logits, rows)
        apply_penalties(logits, rows)
        torch.testing.assert_close(logits.cpu(), expected)
