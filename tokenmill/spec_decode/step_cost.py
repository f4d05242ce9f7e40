"""What a target step of n query tokens costs: the adaptive policy's (policy.py) time model, learnt from the steps the
engine runs.

``RidgeStepCost`` is the prior: t(n) = max(1, n / saturation_tokens), flat while the step's tokens fit one read of
the weights, then growing in proportion. ``MeasuredStepCost`` starts from it and replaces it with measurements: the
engine reports each step it lands as (query tokens, seconds from launch to landing) — timestamps it takes anyway,
so no extra device synchronisation (on CUDA the landing already waits for the sampled ids). Steps are kept in
buckets of similar n (exact up to 16, then ~19% apart), each holding its last ``window`` times; a bucket with at
least ``min_samples`` of them is known and its median is its cost. Between known buckets the cost is interpolated
linearly; outside them the prior's shape is scaled to the nearest known bucket (optimistic where nothing was
measured, so an untried k gets tried and measured). A bucket not refreshed for ``max_age`` steps is forgotten, so
an outlier measured under a passing load does not decide forever. Costs are in seconds once anything is measured.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from typing import Protocol

# Query tokens at which a decode step stops being bound by reading the weights (the prior until measured: an 8B bf16
# model on an H100 stays flat to ~128 rows, benchmarks/gpu_spec_decode.py measures it; SmolLM2-135M on one core of
# the project's CPU box costs 1.4x a 1-token step at 5 tokens, benchmarks/results/spec_decode_cpu_*). Below the ridge
# the prior is optimistic, so speculation is tried and measured; above it the prior keeps a busy batch plain.
SATURATION_TOKENS = {"cuda": 128, "cpu": 4}


class StepCost(Protocol):
    """Relative or absolute time of a step of ``num_tokens`` query tokens (only ratios matter to the policy)."""

    def __call__(self, num_tokens: int) -> float: ...

    def known(self, num_tokens: int) -> bool:
        """Whether the cost at this size comes from measurements (the policy probes sizes that are not)."""
        ...

    def record(self, num_tokens: int, seconds: float) -> None: ...


class RidgeStepCost:
    """The fixed prior: flat up to ``saturation_tokens``, then proportional (never learns; tests inject it)."""

    def __init__(self, saturation_tokens: float) -> None:
        if saturation_tokens <= 0:
            raise ValueError(f"saturation_tokens must be > 0; got {saturation_tokens}")
        self.saturation_tokens = saturation_tokens

    def __call__(self, num_tokens: int) -> float:
        return max(1.0, num_tokens / self.saturation_tokens)

    def known(self, num_tokens: int) -> bool:
        return True

    def record(self, num_tokens: int, seconds: float) -> None:
        pass


def bucket_of(num_tokens: int) -> int:
    """The representative size of ``num_tokens``'s bucket: itself up to 16, then a grid of 4 points per doubling."""
    if num_tokens <= 16:
        return max(1, num_tokens)
    return round(2 ** (round(math.log2(num_tokens) * 4) / 4))


class MeasuredStepCost:
    def __init__(self, prior: RidgeStepCost, window: int = 15, min_samples: int = 3, max_age: int = 256) -> None:
        if min_samples < 1 or window < min_samples:
            raise ValueError(f"need 1 <= min_samples <= window; got min_samples {min_samples}, window {window}")
        self.prior = prior
        self.window, self.min_samples, self.max_age = window, min_samples, max_age
        self.num_steps = 0
        self._times: dict[int, deque[float]] = {}
        self._medians: dict[int, float] = {}  # bucket -> median of its times, once it has min_samples
        self._last_seen: dict[int, int] = {}  # bucket -> num_steps when it last got a sample
        self._points: list[tuple[int, float]] | None = []  # known (bucket, median), increasing; None: stale
        self._sizes: list[int] = []  # the points' buckets (for bisect)

    def record(self, num_tokens: int, seconds: float) -> None:
        if num_tokens < 1 or not seconds > 0:  # an empty step or a clock step backwards says nothing
            return
        bucket = bucket_of(num_tokens)
        self.num_steps += 1
        times = self._times.get(bucket)
        if times is None:
            times = self._times[bucket] = deque(maxlen=self.window)
        times.append(seconds)
        if len(times) >= self.min_samples:
            self._medians[bucket] = statistics.median(times)
        self._last_seen[bucket] = self.num_steps
        self._points = None

    def known(self, num_tokens: int) -> bool:
        bucket = bucket_of(num_tokens)
        return (len(self._times.get(bucket, ())) >= self.min_samples
                and self.num_steps - self._last_seen[bucket] <= self.max_age)

    def points(self) -> list[tuple[int, float]]:
        """The known buckets' median seconds, made non-decreasing in n from the right (a larger step never costs
        less: a noisy high small-n median is lowered, which errs towards speculation looking dear)."""
        if self._points is None:
            for bucket in [b for b, seen in self._last_seen.items() if self.num_steps - seen > self.max_age]:
                del self._times[bucket], self._last_seen[bucket]
                self._medians.pop(bucket, None)
            known = sorted(self._medians.items())
            for i in range(len(known) - 2, -1, -1):
                if known[i][1] > known[i + 1][1]:
                    known[i] = (known[i][0], known[i + 1][1])
            self._points, self._sizes = known, [n for n, _ in known]
        return self._points

    def __call__(self, num_tokens: int) -> float:
        points = self.points()
        if not points:
            return self.prior(num_tokens)
        sizes = self._sizes
        i = bisect.bisect_left(sizes, num_tokens)
        if i < len(points) and sizes[i] == num_tokens:
            return points[i][1]
        if i == 0 or i == len(points):  # outside the measured range: the prior's shape from the nearest point
            n, seconds = points[0] if i == 0 else points[-1]
            return seconds * self.prior(num_tokens) / self.prior(n)
        (n0, t0), (n1, t1) = points[i - 1], points[i]
        return t0 + (t1 - t0) * (num_tokens - n0) / (n1 - n0)


def measured_step_cost(device: str) -> MeasuredStepCost:
    """The engine's step cost on ``device``: measured, with the device kind's ridge as the prior."""
    return MeasuredStepCost(RidgeStepCost(SATURATION_TOKENS["cuda" if device.startswith("cuda") else "cpu"]))
