"""Capacity planner: the highest load one replica sustains within an SLO, and the replicas a target rate needs.

Criterion (goodput): walking the sweep from lightest to heaviest load, a point passes while at least
``min_good_fraction`` of its sent requests complete within the SLO; the first failing point ends the walk
(a heavier point that passes after a failure is noise, not capacity). One replica's rate is the highest
goodput (good requests/s) among the passing points; replicas = ceil(target_qps / that rate).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from tokenmill.bench.metrics import SLO, summarize
from tokenmill.bench.results import load_value, run_records


@dataclass
class PlanPoint:
    label: str
    load: float  # the sweep axis value (inf for an unlimited rate)
    num_sent: int
    good_requests: int
    good_fraction: float
    goodput: float
    passes: bool


@dataclass
class CapacityPlan:
    slo: dict[str, float | None]
    min_good_fraction: float
    target_qps: float
    points: list[PlanPoint] = field(default_factory=list)
    chosen: PlanPoint | None = None
    per_replica_rate: float | None = None
    replicas: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def replicas_needed(target_qps: float, per_replica_rate: float) -> int:
    """ceil(target / per-replica rate), at least 1."""
    if not per_replica_rate > 0:
        raise ValueError(f"per-replica rate ({per_replica_rate}) must be > 0 requests/s to plan replicas")
    # Round off float noise first: 0.3 / 0.1 is 2.9999999999999996 and must plan 3 replicas, not 3 → 4.
    return max(1, math.ceil(round(target_qps / per_replica_rate, 9)))


def _point(run: dict[str, Any], param: str | None, slo: SLO) -> PlanPoint:
    records = run_records(run)
    if records is not None:
        summary = summarize(records, slo)
    else:
        summary = run["summary"]
        if SLO.from_dict(summary.get("slo")) != slo:
            raise ValueError(
                f"run {run['label']!r} has no per-request records (record the sweep with --save-detailed) and "
                f"its stored SLO {summary.get('slo')} differs from the requested {slo.to_dict()}"
            )
    sent = summary["num_sent"]
    good = summary["good_requests"] or 0
    x = load_value(run, param)
    return PlanPoint(
        label=run["label"],
        load=math.inf if x is None else float(x),
        num_sent=sent,
        good_requests=good,
        good_fraction=good / sent if sent else 0.0,
        goodput=summary["goodput"] or 0.0,
        passes=False,
    )


def plan_capacity(
    document: dict[str, Any], slo: SLO | None, target_qps: float, min_good_fraction: float = 0.95
) -> CapacityPlan:
    """Apply the goodput criterion (module docstring) to a sweep's runs."""
    if not target_qps > 0:
        raise ValueError(f"--target-qps ({target_qps}) must be > 0 requests/s")
    if not 0 < min_good_fraction <= 1:
        raise ValueError(f"--min-good-fraction ({min_good_fraction}) must be in (0, 1]")
    if slo is None:
        stored = document["runs"][0]["summary"].get("slo")
        if not stored:
            raise ValueError("no SLO: pass --slo ttft=MS,tpot=MS,e2e=MS or record the sweep with --slo")
        slo = SLO.from_dict(stored)
    if slo.is_empty:
        raise ValueError("--slo must set at least one of ttft, tpot, e2e")
    param = (document.get("sweep") or {}).get("param")
    points = sorted((_point(run, param, slo) for run in document["runs"]), key=lambda p: p.load)
    plan = CapacityPlan(slo.to_dict(), min_good_fraction, target_qps, points)
    for point in points:
        if point.num_sent == 0 or point.good_fraction < min_good_fraction:
            break
        point.passes = True
        if plan.chosen is None or point.goodput > plan.chosen.goodput:
            plan.chosen = point
    if plan.chosen is not None and plan.chosen.goodput > 0:
        plan.per_replica_rate = plan.chosen.goodput
        plan.replicas = replicas_needed(target_qps, plan.chosen.goodput)
    return plan
