"""The adaptive policy with an injected step cost: speculate while verification is cheap and drafts land, stop when
the batch saturates, when acceptance is low and steps cost more with tokens; retry rows that sat out."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tokenmill.spec_decode.policy import AdaptivePolicy, expected_tokens
from tokenmill.spec_decode.step_cost import RidgeStepCost, measured_step_cost


class LinearCost:
    """A CPU-like step: a fixed part plus a part per query token (every size known: nothing to probe)."""

    def __init__(self, fixed: float, per_token: float) -> None:
        self.fixed, self.per_token = fixed, per_token

    def __call__(self, num_tokens: int) -> float:
        return self.fixed + self.per_token * num_tokens

    def known(self, num_tokens: int) -> bool:
        return True

    def record(self, num_tokens: int, seconds: float) -> None:
        pass


def ridge(saturation: float = 128) -> RidgeStepCost:
    return RidgeStepCost(saturation)


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(0.3, 3) == pytest.approx(1 + 0.3 + 0.09 + 0.027)


def test_small_batches_speculate_and_saturated_batches_do_not():
    policy = AdaptivePolicy(max_k=4, step_cost=ridge())
    ids = [f"s{i}" for i in range(256)]
    assert policy.plan(ids[:1], uniform=True).k == 4  # verification is free at batch 1
    assert policy.plan(ids[:32], uniform=True).k == 3  # 32 x 4 tokens still fit one weight read; 32 x 5 do not
    assert policy.plan(ids[:256], uniform=True).k == 0  # compute-bound already: every extra query token costs time


def test_low_acceptance_turns_speculation_down():
    policy = AdaptivePolicy(max_k=4, step_cost=ridge())
    ids = [f"s{i}" for i in range(80)]  # 80 x 2 tokens cost 1.25 plain steps: worth it only if drafts land
    assert policy.plan(ids, uniform=True).k == 1
    for seq_id in ids:
        policy.observe(seq_id, 1, 0)
        policy.observe(seq_id, 1, 0)
    assert policy.acceptance(ids[0]) < 0.25
    assert policy.plan(ids, uniform=True).k == 0
    policy.release(ids[0])
    assert policy.acceptance(ids[0]) == policy.prior


def _run(policy: AdaptivePolicy, seq_id: str, steps: int, accept: Callable[[int], int]) -> list[int]:
    """Plan ``steps`` steps of one row; a verification of k drafts accepts ``accept(k)`` of them. The ks planned."""
    ks = []
    for _ in range(steps):
        k = policy.plan([seq_id]).k
        ks.append(k)
        if k:
            policy.observe(seq_id, k, accept(k))
    return ks


def test_costly_verification_stops_a_row_with_low_acceptance_within_a_few_steps():
    # A 5-token step costs 1.8 one-token steps (SmolLM2 on two CPU cores is of this kind): worth it at the prior's
    # acceptance, not at chat's (~7% of drafts accepted).
    policy = AdaptivePolicy(max_k=4, step_cost=LinearCost(fixed=0.8, per_token=0.2))
    ks = _run(policy, "chat", 240, accept=lambda k: 0)
    assert ks[0] > 0 and ks[1] > 0 and not any(ks[2:30])  # two failed verifications and it stops
    # Sitting out, the row retries now and then; a retry that fails is cheap (it stops again at once).
    retries = sum(1 for k in ks[2:] if k)
    assert 1 <= retries <= 10  # a 2-token step that yields one token, about one step in forty


def test_a_row_that_turns_repetitive_picks_speculation_back_up():
    policy = AdaptivePolicy(max_k=4, step_cost=LinearCost(fixed=0.8, per_token=0.2))
    for _ in range(6):
        policy.observe("row", 4, 0)
    assert policy.plan(["row"]).k == 0
    ks = _run(policy, "row", 300, accept=lambda k: k)  # the text now repeats: every draft that is verified lands
    first = next(i for i, k in enumerate(ks) if k)
    assert first < 150 and all(k == 4 for k in ks[first + 5 :])


def test_nearly_free_verification_with_high_acceptance_speculates_fully():
    policy = AdaptivePolicy(max_k=4, step_cost=LinearCost(fixed=1.0, per_token=0.001))
    for _ in range(10):
        policy.observe("quote", 4, 4)
    assert policy.acceptance("quote") > 0.8
    assert policy.plan(["quote"]).k == 4


def test_rows_are_chosen_by_acceptance_unless_every_row_must_match():
    policy = AdaptivePolicy(max_k=4, step_cost=LinearCost(fixed=0.8, per_token=0.05))
    for _ in range(10):
        policy.observe("good", 4, 4)
        policy.observe("bad", 4, 0)
    plan = policy.plan(["bad", "good"])
    assert plan.k > 0 and plan.seq_ids == ("good",)
    uniform = policy.plan(["bad", "good"], uniform=True)  # CUDA graphs: one query length for all rows
    assert uniform.k == 0 or set(uniform.seq_ids) == {"bad", "good"}


def test_draft_cost_and_the_off_switches():
    ids = ["a", "b"]
    # A draft model as slow as the target never pays.
    assert AdaptivePolicy(max_k=4, step_cost=ridge(), draft_cost=1.0).plan(ids, uniform=True).k == 0
    assert AdaptivePolicy(max_k=4, step_cost=ridge(), draft_cost=0.05).plan(ids, uniform=True).k > 0
    assert AdaptivePolicy(max_k=4, step_cost=ridge(), disable_by_batch_size=1).plan(ids, uniform=True).k == 0
    fixed = AdaptivePolicy(max_k=3, step_cost=ridge(1), adaptive=False)
    assert fixed.plan(ids, uniform=True).k == 3 and fixed.plan([], uniform=True).k == 0


def test_may_speculate_is_false_once_the_batch_saturates():
    policy = AdaptivePolicy(max_k=4, step_cost=ridge())
    assert policy.may_speculate(1) and policy.may_speculate(100)
    assert not policy.may_speculate(128) and not policy.may_speculate(256) and not policy.may_speculate(0)
    assert AdaptivePolicy(max_k=4, step_cost=ridge(), adaptive=False).may_speculate(256)
    # Steps that cost in proportion to their tokens from the first one: no batch pays for drafts.
    assert not AdaptivePolicy(max_k=4, step_cost=LinearCost(fixed=0.0, per_token=1.0)).may_speculate(1)


def test_giving_up_overlap_is_judged_by_the_prior_not_the_measured_costs():
    """Measured costs that make a 5-token verification at batch 256 look cheap (launch to landing cannot see what
    overlapping steps saves) still leave an overlapping engine plain there; plan() uses the measurements."""
    cost = measured_step_cost("cuda")
    for _ in range(3):
        cost.record(256, 0.015)
        cost.record(1280, 0.020)
    policy = AdaptivePolicy(max_k=4, step_cost=cost)
    assert not policy.may_speculate(256) and policy.may_speculate(8)
    assert policy.plan([f"s{i}" for i in range(256)], uniform=True).k > 0
