"""Metric definitions as pure functions on ``RequestRecord`` lists: TTFT, TPOT, ITL, E2E, throughput, goodput.

docs/BENCHMARKING.md states each definition; the HTML report repeats them. Latencies come out in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.bench.records import RequestRecord

PERCENTILES = (("median", 50.0), ("p90", 90.0), ("p99", 99.0))
SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass(frozen=True)
class SLO:
    """Per-request latency limits in milliseconds; None means no limit on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def __post_init__(self) -> None:
        for key in SLO_KEYS:
            value = getattr(self, f"{key}_ms")
            if value is not None and not value > 0:
                raise ValueError(f"SLO {key} ({value} ms) must be > 0 milliseconds")

    @property
    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def to_dict(self) -> dict[str, float | None]:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SLO:
        data = data or {}
        return cls(data.get("ttft_ms"), data.get("tpot_ms"), data.get("e2e_ms"))


def parse_slo(text: str) -> SLO:
    """``"ttft=500,tpot=50,e2e=10000"`` (milliseconds) → SLO; any subset of the three keys."""
    limits: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"--slo entry {part!r} must be KEY=MILLISECONDS with KEY one of {', '.join(SLO_KEYS)}"
            )
        try:
            limits[f"{key}_ms"] = float(value)
        except ValueError as exc:
            raise ValueError(f"--slo {key} value {value!r} must be a number of milliseconds") from exc
    return SLO(**limits)


def ttft(record: RequestRecord) -> float | None:
    """Seconds from sending the request to the first chunk that carries text."""
    first = record.first_token
    return None if first is None else first - record.start


def e2e_latency(record: RequestRecord) -> float:
    """Seconds from sending the request to the end of the response stream."""
    return record.end - record.start


def tpot(record: RequestRecord) -> float | None:
    """vLLM's TPOT: (E2E − TTFT) / (output_tokens − 1); undefined for fewer than two output tokens."""
    first = ttft(record)
    if first is None or record.output_tokens < 2:
        return None
    return (e2e_latency(record) - first) / (record.output_tokens - 1)


def itl(record: RequestRecord) -> list[float]:
    """Gaps between successive text chunks (a chunk carrying several tokens counts as one gap)."""
    times = record.token_times
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def distribution_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """mean, median, p90, p99, max of latencies given in seconds, reported in milliseconds.

    Percentiles use numpy's default linear interpolation between closest ranks.
    """
    values = np.asarray(list(values_s), dtype=float) * 1000.0
    if values.size == 0:
        return {"mean": None, **{name: None for name, _ in PERCENTILES}, "max": None, "count": 0}
    out: dict[str, float | None] = {"mean": float(values.mean())}
    for name, q in PERCENTILES:
        out[name] = float(np.percentile(values, q))
    out["max"] = float(values.max())
    out["count"] = int(values.size)
    return out


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at one instant (an end at the same time as a start frees its slot first)."""
    events = sorted(
        [(r.start, 1) for r in records] + [(r.end, -1) for r in records], key=lambda e: (e[0], e[1])
    )
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """A completed request whose TTFT, TPOT and E2E are all within the limits set (TPOT of a one-token
    answer is undefined and so passes; a missing first token fails a TTFT limit)."""
    if not record.ok:
        return False
    if slo.ttft_ms is not None:
        first = ttft(record)
        if first is None or first * 1000.0 > slo.ttft_ms:
            return False
    if slo.tpot_ms is not None:
        per_token = tpot(record)
        if per_token is not None and per_token * 1000.0 > slo.tpot_ms:
            return False
    return slo.e2e_ms is None or e2e_latency(record) * 1000.0 <= slo.e2e_ms


def benchmark_duration(records: Sequence[RequestRecord]) -> float:
    """Seconds from the first measured request's start to the last one's end."""
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def _per_second(count: float, duration: float) -> float:
    return count / duration if duration > 0 else 0.0


def summarize(
    records: Sequence[RequestRecord], slo: SLO | None = None, num_not_sent: int = 0
) -> dict[str, Any]:
    """The summary of one run: counts, errors by kind, throughput, goodput and latency distributions."""
    done = [r for r in records if r.ok]
    duration = benchmark_duration(records)
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "num_sent": len(records),
        "num_completed": len(done),
        "num_failed": len(records) - len(done),
        "num_not_sent": num_not_sent,
        "errors": dict(sorted(Counter(r.error for r in records if not r.ok).items())),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": _per_second(len(done), duration),
        "output_throughput": _per_second(output_tokens, duration),
        "total_token_throughput": _per_second(input_tokens + output_tokens, duration),
        "peak_concurrency": peak_concurrency(records),
        "slo": None if slo is None or slo.is_empty else slo.to_dict(),
        "good_requests": None,
        "goodput": None,
        "ttft_ms": distribution_ms(v for v in map(ttft, done) if v is not None),
        "tpot_ms": distribution_ms(v for v in map(tpot, done) if v is not None),
        "itl_ms": distribution_ms(gap for r in done for gap in itl(r)),
        "e2e_ms": distribution_ms(map(e2e_latency, done)),
    }
    if slo is not None and not slo.is_empty:
        good = sum(meets_slo(r, slo) for r in records)
        summary["good_requests"] = good
        summary["goodput"] = _per_second(good, duration)
    return summary
