"""Arrival process: mean rate and burstiness (coefficient of variation) checked against theory.

Gamma(k, 1/(rate·k)) gaps: mean 1/rate, CV 1/sqrt(k). With n samples the sample mean's relative standard
error is CV/sqrt(n); the bounds below are 5 standard errors, so a correct generator passes for any seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.bench.arrivals import arrival_offsets, inter_arrival_times

N = 20_000


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_mean_rate_and_burstiness(burstiness: float, seed: int) -> None:
    rate = 10.0
    gaps = inter_arrival_times(N, rate, burstiness, seed)
    cv_theory = 1.0 / math.sqrt(burstiness)
    assert gaps.mean() == pytest.approx(1.0 / rate, rel=5 * cv_theory / math.sqrt(N))
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(cv_theory, rel=0.1)


def test_burstier_process_has_larger_spread() -> None:
    cvs = [np.std(g) / np.mean(g) for g in (inter_arrival_times(N, 5.0, b, 3) for b in (0.2, 1.0, 5.0))]
    assert cvs[0] > cvs[1] > cvs[2]


def test_offsets_start_at_zero_and_keep_the_rate() -> None:
    offsets = arrival_offsets(N, 50.0, 1.0, seed=7)
    assert offsets[0] == 0.0
    assert np.all(np.diff(offsets) >= 0)
    assert (N - 1) / offsets[-1] == pytest.approx(50.0, rel=5 / math.sqrt(N))


def test_same_seed_same_schedule() -> None:
    assert np.array_equal(arrival_offsets(100, 3.0, 0.5, 11), arrival_offsets(100, 3.0, 0.5, 11))
    assert not np.array_equal(arrival_offsets(100, 3.0, 0.5, 11), arrival_offsets(100, 3.0, 0.5, 12))


def test_infinite_rate_sends_everything_at_once() -> None:
    assert np.array_equal(arrival_offsets(5, math.inf), np.zeros(5))


@pytest.mark.parametrize(
    ("rate", "burstiness", "match"), [(0.0, 1.0, "request rate"), (1.0, 0.0, "burstiness")]
)
def test_invalid_parameters_are_named(rate: float, burstiness: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        inter_arrival_times(3, rate, burstiness)
