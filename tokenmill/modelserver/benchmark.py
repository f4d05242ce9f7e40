"""trtexec-like measurement: latency p50/p90/p99 and throughput per batch size for one backend.

Used by ``tokenmill bench-model`` and benchmarks/modelserver_*.py; timings are wall clock around backend.run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class BatchResult:
    backend: str
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_per_s: float  # samples per second

    def line(self) -> str:
        return (f"{self.backend:>12} batch {self.batch_size:>3}: p50 {self.p50_ms:8.2f} ms  p90 {self.p90_ms:8.2f} ms"
                f"  p99 {self.p99_ms:8.2f} ms  {self.throughput_per_s:9.1f} samples/s")

    def as_dict(self) -> dict:
        return asdict(self)


def measure(run: Callable[[], object], batch_size: int, backend: str, warmup: int = 3, iterations: int = 20,
            min_seconds: float = 0.0) -> BatchResult:
    """Call ``run`` ``warmup`` times, then at least ``iterations`` times (and ``min_seconds``), timing each call."""
    for _ in range(warmup):
        run()
    times = []
    start = time.perf_counter()
    while len(times) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000.0
    return BatchResult(backend, batch_size, len(times), float(np.percentile(ms, 50)), float(np.percentile(ms, 90)),
                       float(np.percentile(ms, 99)), float(ms.mean()), batch_size * len(times) / float(ms.sum() / 1000))


def synthetic_feeds(inputs: dict[str, tuple[list[int], np.dtype]], batch_size: int, seq_len: int = 64,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for a model's inputs (dims without batch, -1 = ``seq_len``); int inputs get small ids."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (dims, dtype) in inputs.items():
        shape = [batch_size, *[seq_len if d == -1 else d for d in dims]]
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones(shape, dtype=dtype)
        else:
            feeds[name] = rng.integers(1000, 20000, size=shape).astype(dtype)
    return feeds
