"""The measured step cost: the ridge prior until a size has enough samples, medians of recent steps, interpolation
between measured sizes, old measurements forgotten; and the policy probing the plain step it compares against."""

from __future__ import annotations

import pytest

from tokenmill.spec_decode.policy import AdaptivePolicy
from tokenmill.spec_decode.step_cost import MeasuredStepCost, RidgeStepCost, bucket_of


def measured(**kwargs) -> MeasuredStepCost:
    return MeasuredStepCost(RidgeStepCost(8), **kwargs)


def test_buckets_are_exact_for_small_steps_then_geometric():
    assert [bucket_of(n) for n in (0, 1, 5, 16)] == [1, 1, 5, 16]
    assert bucket_of(17) == 16 and bucket_of(18) == bucket_of(20) == 19  # the nearest of 16, 2 ** 4.25, ...
    assert bucket_of(1000) == bucket_of(1024) == 1024
    with pytest.raises(ValueError, match="min_samples"):
        measured(window=2, min_samples=3)
    with pytest.raises(ValueError, match="saturation_tokens"):
        RidgeStepCost(0)


def test_the_prior_holds_until_a_size_has_enough_samples():
    cost = measured(min_samples=3)
    assert cost(1) == cost(8) == 1.0 and cost(16) == 2.0
    cost.record(5, 0.02)
    cost.record(5, 0.03)
    assert not cost.known(5) and cost(5) == 1.0
    cost.record(5, 0.9)  # an outlier: the median ignores it
    assert cost.known(5) and cost(5) == pytest.approx(0.03)
    cost.record(0, 1.0)  # an empty step and a non-positive time say nothing
    cost.record(3, 0.0)
    assert not cost.known(3) and cost.num_steps == 3


def test_measured_sizes_are_interpolated_and_the_prior_shape_extends_them():
    cost = measured(min_samples=1)
    cost.record(1, 0.010)
    cost.record(5, 0.020)
    cost.record(64, 0.200)
    assert cost(1) == pytest.approx(0.010) and cost(5) == pytest.approx(0.020)
    assert cost(3) == pytest.approx(0.015)  # halfway between 1 and 5
    assert cost(128) == pytest.approx(0.400)  # past the largest: the prior's proportional part
    # Below the smallest measured size the prior is flat (optimistic: the policy probes it, see below).
    only_large = measured(min_samples=1)
    only_large.record(5, 0.020)
    assert only_large(1) == pytest.approx(0.020)


def test_a_larger_step_never_costs_less_and_old_sizes_are_forgotten():
    cost = measured(min_samples=1, max_age=4)
    cost.record(2, 0.050)  # a noisy small step measured dearer than a larger one
    cost.record(4, 0.030)
    assert cost(2) == pytest.approx(0.030) and cost(4) == pytest.approx(0.030)
    for _ in range(5):
        cost.record(4, 0.030)
    assert not cost.known(2) and [n for n, _ in cost.points()] == [4]


def test_the_policy_probes_the_plain_step_it_compares_against():
    # Only the speculative size is measured: every probe_interval-th plan decodes plainly until the plain step is.
    cost = measured(min_samples=2)
    policy = AdaptivePolicy(max_k=4, step_cost=cost, probe_interval=4)
    for _ in range(2):
        cost.record(5, 0.020)
    plans = [policy.plan(["a"]).k for _ in range(8)]
    assert plans == [4, 4, 4, 0, 4, 4, 4, 0]
    cost.record(1, 0.010)
    cost.record(1, 0.010)  # now known: a 5-token step costs two 1-token steps
    for _ in range(5):
        policy.observe("a", 4, 0)
    assert [policy.plan(["a"]).k for _ in range(4)] == [0, 0, 0, 0]
