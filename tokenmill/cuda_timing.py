"""Time GPU work with CUDA events: what the start-up GEMM tuner and the GPU benchmarks measure with."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def event_times_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    """Device time of each of ``repeats`` calls of ``fn`` (ms), each between two CUDA events on the current
    stream; the host waits for every call, so launch queues do not pile up across calls."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def median_event_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median of ``event_times_ms``."""
    return statistics.median(event_times_ms(fn, repeats))
