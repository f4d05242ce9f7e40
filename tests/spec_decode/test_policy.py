"""The adaptive policy: speculate while verification is cheap and drafts land, stop when the batch saturates."""

from __future__ import annotations

import pytest

from tokenmill.spec_decode.policy import AdaptivePolicy, expected_tokens


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_small_batches_speculate_and_saturated_batches_do_not():
    policy = AdaptivePolicy(max_k=4, saturation_tokens=128)
    ids = [f"s{i}" for i in range(256)]
    assert policy.choose_k(ids[:1]) == 4  # verification is free at batch 1
    assert policy.choose_k(ids[:32]) == 3  # 32 x 4 tokens still fit one weight read; 32 x 5 do not
    assert policy.choose_k(ids[:256]) == 0  # compute-bound already: every extra query token costs time


def test_low_acceptance_turns_speculation_down():
    policy = AdaptivePolicy(max_k=4, saturation_tokens=128)
    ids = [f"s{i}" for i in range(80)]  # 80 x 2 tokens cost 1.25 plain steps: worth it only if drafts land
    high = policy.choose_k(ids)
    assert high == 1
    for _ in range(20):
        for seq_id in ids:
            policy.observe(seq_id, 4, 0)
    assert policy.acceptance(ids[0]) < 0.15
    assert policy.choose_k(ids) == 0
    policy.release(ids[0])
    assert policy.acceptance(ids[0]) == policy.prior


def test_draft_cost_and_the_off_switches():
    ids = ["a", "b"]
    assert AdaptivePolicy(max_k=4, saturation_tokens=128, draft_cost=1.0).choose_k(ids) == 0  # as slow as the target
    assert AdaptivePolicy(max_k=4, saturation_tokens=128, draft_cost=0.05).choose_k(ids) > 0
    assert AdaptivePolicy(max_k=4, saturation_tokens=128, disable_by_batch_size=1).choose_k(ids) == 0
    fixed = AdaptivePolicy(max_k=3, saturation_tokens=1, adaptive=False)
    assert fixed.choose_k(ids) == 3 and fixed.choose_k([]) == 0


def test_may_speculate_is_false_once_the_batch_saturates():
    policy = AdaptivePolicy(max_k=4, saturation_tokens=128)
    assert policy.may_speculate(1) and policy.may_speculate(100)
    assert not policy.may_speculate(128) and not policy.may_speculate(256) and not policy.may_speculate(0)
    assert AdaptivePolicy(max_k=4, saturation_tokens=128, adaptive=False).may_speculate(256)
