"""Every metric on a hand-built request timeline, with answers computed by hand in the comments."""

from __future__ import annotations

import pytest

from tokenmill.bench import metrics
from tokenmill.bench.metrics import SLO, parse_slo, summarize
from tokenmill.bench.records import RequestRecord


def timeline() -> list[RequestRecord]:
    # A: TTFT 100 ms, E2E 400 ms, 4 tokens → TPOT (400−100)/3 = 100 ms; gaps 50, 100, 50 ms.
    a = RequestRecord(
        0, start=0.0, end=0.4, token_times=[0.1, 0.15, 0.25, 0.3], output_tokens=4, prompt_tokens=10
    )
    # B: TTFT 300 ms, E2E 500 ms, 2 tokens → TPOT (500−300)/1 = 200 ms; gap 200 ms.
    b = RequestRecord(1, start=0.2, end=0.7, token_times=[0.5, 0.7], output_tokens=2, prompt_tokens=20)
    # C: failed with HTTP 500; excluded from latencies and token totals.
    c = RequestRecord(2, start=0.3, end=0.35, prompt_tokens=7, error="http_500")
    # D: one token: TTFT 50 ms, E2E 100 ms, no TPOT, no gaps.
    d = RequestRecord(3, start=1.0, end=1.1, token_times=[1.05], output_tokens=1, prompt_tokens=5)
    return [a, b, c, d]


def test_per_request_metrics() -> None:
    a, b, c, d = timeline()
    assert metrics.ttft(a) == pytest.approx(0.1)
    assert metrics.e2e_latency(b) == pytest.approx(0.5)
    assert metrics.tpot(a) == pytest.approx(0.1)
    assert metrics.tpot(b) == pytest.approx(0.2)
    assert metrics.tpot(d) is None
    assert metrics.ttft(c) is None
    assert metrics.itl(a) == pytest.approx([0.05, 0.1, 0.05])
    assert metrics.itl(d) == []


def test_distribution_uses_linear_interpolation() -> None:
    # Sorted [50, 100, 300]: p90 sits at rank 1.8 → 100 + 0.8·200 = 260; p99 at 1.98 → 296.
    dist = metrics.distribution_ms([0.1, 0.3, 0.05])
    assert dist == pytest.approx(
        {"mean": 150.0, "median": 100.0, "p90": 260.0, "p99": 296.0, "max": 300.0, "count": 3}
    )
    empty = metrics.distribution_ms([])
    assert empty["mean"] is None and empty["count"] == 0


def test_summary_of_timeline() -> None:
    s = summarize(timeline())
    assert (s["num_sent"], s["num_completed"], s["num_failed"]) == (4, 3, 1)
    assert s["errors"] == {"http_500": 1}
    assert s["duration_s"] == pytest.approx(1.1)  # first start 0.0 → last end 1.1
    assert s["total_input_tokens"] == 35  # 10 + 20 + 5, the failed request's 7 left out
    assert s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(3 / 1.1)
    assert s["output_throughput"] == pytest.approx(7 / 1.1)
    assert s["total_token_throughput"] == pytest.approx(42 / 1.1)
    assert s["peak_concurrency"] == 3  # A, B and C overlap at t = 0.3
    assert s["ttft_ms"] == pytest.approx(
        {"mean": 150, "median": 100, "p90": 260, "p99": 296, "max": 300, "count": 3}
    )
    # TPOT [100, 200]: p90 = 100 + 0.9·100.
    assert s["tpot_ms"] == pytest.approx(
        {"mean": 150, "median": 150, "p90": 190, "p99": 199, "max": 200, "count": 2}
    )
    # ITL pooled [50, 50, 100, 200]: median 75; p90 at rank 2.7 → 100 + 0.7·100 = 170; p99 → 197.
    assert s["itl_ms"] == pytest.approx(
        {"mean": 100, "median": 75, "p90": 170, "p99": 197, "max": 200, "count": 4}
    )
    # E2E [400, 500, 100]: p90 at rank 1.8 → 400 + 0.8·100 = 480.
    assert s["e2e_ms"] == pytest.approx(
        {"mean": 1000 / 3, "median": 400, "p90": 480, "p99": 498, "max": 500, "count": 3}
    )
    assert s["goodput"] is None and s["good_requests"] is None


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        # B fails TTFT (300 > 200), C failed, D has no TPOT so passes that limit: A and D are good.
        (SLO(ttft_ms=200, tpot_ms=150), 2),
        (SLO(ttft_ms=200, tpot_ms=150, e2e_ms=450), 2),
        (SLO(ttft_ms=200, e2e_ms=350), 1),  # A's 400 ms E2E now fails
        (SLO(tpot_ms=99), 1),  # A (100) and B (200) fail TPOT; D passes
        (SLO(e2e_ms=10_000), 3),  # every completed request
    ],
)
def test_goodput(slo: SLO, good: int) -> None:
    s = summarize(timeline(), slo)
    assert s["good_requests"] == good
    assert s["goodput"] == pytest.approx(good / 1.1)
    assert s["slo"] == slo.to_dict()


def test_peak_concurrency_end_frees_slot_before_a_start_at_the_same_instant() -> None:
    back_to_back = [RequestRecord(0, 0.0, 1.0), RequestRecord(1, 1.0, 2.0)]
    assert metrics.peak_concurrency(back_to_back) == 1
    assert metrics.peak_concurrency([]) == 0


def test_empty_run_summarizes_to_zeros() -> None:
    s = summarize([])
    assert s["num_sent"] == 0 and s["request_throughput"] == 0.0 and s["duration_s"] == 0.0


def test_parse_slo() -> None:
    assert parse_slo("ttft=500, tpot=50") == SLO(ttft_ms=500, tpot_ms=50)
    assert parse_slo("E2E=1e4") == SLO(e2e_ms=10_000)
    with pytest.raises(ValueError, match="KEY one of ttft, tpot, e2e"):
        parse_slo("latency=5")
    with pytest.raises(ValueError, match="must be a number"):
        parse_slo("ttft=fast")
    with pytest.raises(ValueError, match="must be > 0"):
        parse_slo("tpot=0")
