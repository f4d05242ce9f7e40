"""``bench compare`` renders two runs side by side; ``bench plan`` on a hand-built sweep gives the hand answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.bench.html_report import compare_rows
from tokenmill.bench.metrics import SLO, summarize
from tokenmill.bench.plan import plan_capacity, replicas_needed
from tokenmill.bench.records import RequestRecord
from tokenmill.bench.results import make_document, make_run, save_json
from tokenmill.cli import main


def point(duration: float, ttfts_ms: list[float]) -> list[RequestRecord]:
    """len(ttfts) requests spread so the run lasts exactly ``duration`` s; each has 1 s E2E and 5 tokens."""
    n = len(ttfts_ms)
    step = (duration - 1.0) / (n - 1)
    records = []
    for i, first in enumerate(ttfts_ms):
        start = i * step
        times = [start + first / 1000 + k * 0.1 for k in range(5)]
        records.append(
            RequestRecord(i, start, start + 1.0, token_times=times, output_tokens=5, prompt_tokens=8)
        )
    return records


# rate → (duration s, TTFTs). With the SLO ttft=100 ms:
#   rate 1: 10/10 good in 10 s     → goodput 1.0
#   rate 2: 10/10 good in 5.5 s    → goodput 1.818...
#   rate 4:  9/10 good in 3.25 s   → goodput 2.769...  (one TTFT of 150 ms)
#   rate 8: 10/10 good in 2.125 s  → goodput 4.705...  (noise after a failure)
SWEEP = {
    1.0: (10.0, [50] * 10),
    2.0: (5.5, [50] * 10),
    4.0: (3.25, [50] * 9 + [150]),
    8.0: (2.125, [60] * 10),
}


def sweep_document(detailed: bool, slo: SLO | None = None) -> dict:
    runs = []
    for rate, (duration, ttfts) in SWEEP.items():
        records = point(duration, ttfts)
        load = {"request_rate": rate, "burstiness": 1.0, "max_concurrency": None}
        runs.append(make_run(f"rate={rate:g}", load, summarize(records, slo), records if detailed else None))
    meta = {"label": "sweep", "target": {"base_url": "http://127.0.0.1:1"}, "date": "d", "command": "c"}
    return make_document(meta, {"param": "rate", "values": list(SWEEP)}, runs)


def test_plan_stops_at_the_first_failing_point() -> None:
    plan = plan_capacity(
        sweep_document(detailed=True), SLO(ttft_ms=100), target_qps=10, min_good_fraction=0.95
    )
    assert [p.passes for p in plan.points] == [True, True, False, False]
    assert plan.points[2].good_fraction == pytest.approx(0.9)
    assert plan.chosen.label == "rate=2"
    assert plan.per_replica_rate == pytest.approx(10 / 5.5)
    assert plan.replicas == 6  # ceil(10 / 1.818) = ceil(5.5)


def test_plan_with_looser_fraction_uses_the_heaviest_point() -> None:
    plan = plan_capacity(
        sweep_document(detailed=True), SLO(ttft_ms=100), target_qps=10, min_good_fraction=0.9
    )
    assert all(p.passes for p in plan.points)
    assert plan.per_replica_rate == pytest.approx(10 / 2.125)
    assert plan.replicas == 3  # ceil(10 / 4.706) = ceil(2.125)


def test_plan_without_records_uses_the_stored_slo() -> None:
    doc = sweep_document(detailed=False, slo=SLO(ttft_ms=100))
    assert plan_capacity(doc, None, target_qps=10).replicas == 6
    with pytest.raises(ValueError, match="--save-detailed"):
        plan_capacity(doc, SLO(ttft_ms=55), target_qps=10)


def test_plan_when_nothing_meets_the_slo() -> None:
    plan = plan_capacity(sweep_document(detailed=True), SLO(ttft_ms=10), target_qps=1)
    assert plan.chosen is None and plan.replicas is None


def test_replicas_needed_rounds_float_noise() -> None:
    assert replicas_needed(0.3, 0.1) == 3
    assert replicas_needed(0.5, 2.0) == 1
    with pytest.raises(ValueError, match="must be > 0"):
        replicas_needed(1.0, 0.0)


def test_plan_cli_prints_and_writes_the_answer(tmp_path: Path, capsys) -> None:
    path = save_json(sweep_document(detailed=True), tmp_path / "sweep.json")
    out = tmp_path / "plan.json"
    argv = [
        "bench",
        "plan",
        "--sweep",
        str(path),
        "--slo",
        "ttft=100",
        "--target-qps",
        "10",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    assert "needs 6 replica(s)" in capsys.readouterr().out.replace("\n", " ")
    assert json.loads(out.read_text())["replicas"] == 6


def test_compare_renders_side_by_side(tmp_path: Path, capsys) -> None:
    fast = point(5.0, [40] * 6)
    slow = [
        RequestRecord(r.index, r.start * 2, r.end * 2, [t * 2 for t in r.token_times], 5, 8) for r in fast
    ]
    paths = []
    for name, records in (("ours", fast), ("theirs", slow)):
        meta = {"label": name, "target": {"base_url": "http://127.0.0.1:1"}, "date": "d", "command": "c"}
        doc = make_document(
            meta, None, [make_run("rate=inf", {"request_rate": None}, summarize(records), records)]
        )
        paths.append(str(save_json(doc, tmp_path / f"{name}.json")))
    html_path = tmp_path / "cmp.html"
    assert main(["bench", "compare", *paths, "--output", str(html_path)]) == 0
    html = html_path.read_text()
    assert "ours" in html and "theirs" in html and html.count("<img") >= 2
    # Every timestamp doubled → durations double, throughput halves: −50.0%.
    assert "(-50.0%)" in html and "(+100.0%)" in html
    assert "theirs" in capsys.readouterr().out
    rows = {label: diffs for label, _, diffs in compare_rows([summarize(fast), summarize(slow)])}
    assert rows["Request throughput (req/s)"][1] == pytest.approx(-0.5)
    assert rows["TTFT mean (ms)"][1] == pytest.approx(1.0)


def test_compare_warns_when_workloads_differ(tmp_path: Path, capsys) -> None:
    paths = []
    for name, output_tokens in (("a", 5), ("b", 4)):
        records = [RequestRecord(0, 0.0, 1.0, [0.1, 0.2, 0.3], output_tokens, 8)]
        meta = {"label": name, "target": {}, "dataset": {"name": "random"}, "date": "d", "command": "c"}
        doc = make_document(
            meta, None, [make_run("rate=inf", {"request_rate": None}, summarize(records), records)]
        )
        paths.append(str(save_json(doc, tmp_path / f"{name}.json")))
    assert main(["bench", "compare", *paths, "--output", str(tmp_path / "c.html")]) == 0
    assert "b generated 4 output tokens, a 5" in capsys.readouterr().out
    assert "Workloads differ" in (tmp_path / "c.html").read_text()


def test_compare_needs_two_runs(tmp_path: Path, capsys) -> None:
    assert main(["bench", "compare", str(tmp_path / "a.json")]) == 2
    assert "at least 2 result files" in capsys.readouterr().err
