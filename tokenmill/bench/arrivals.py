"""Request arrival process: all at once (rate inf), Poisson, or gamma with a burstiness factor.

Gamma inter-arrival times with shape k = burstiness and scale 1/(rate·k) keep the mean rate while the
coefficient of variation is 1/sqrt(k): k = 1 is Poisson, k < 1 burstier, k > 1 smoother.
"""

from __future__ import annotations

import math

import numpy as np


def inter_arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seconds to wait before each of ``num`` requests; all zeros when rate is infinite."""
    if num < 0:
        raise ValueError(f"number of requests ({num}) must be >= 0")
    if not rate > 0:
        raise ValueError(f"request rate ({rate}) must be > 0 requests/s, or inf to send all at once")
    if not burstiness > 0:
        raise ValueError(f"burstiness ({burstiness}) must be > 0 (1 = Poisson, < 1 burstier)")
    if math.isinf(rate):
        return np.zeros(num)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)


def arrival_offsets(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send time of each request in seconds after the run starts; the first request goes at 0."""
    gaps = inter_arrival_times(num, rate, burstiness, seed)
    if num == 0:
        return gaps
    # The first request is sent immediately so a run's duration measures serving, not the first wait.
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])
