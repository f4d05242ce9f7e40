"""Rich console tables for ``bench serve`` summaries, ``bench compare`` and ``bench plan``.

Prints to a given rich Console so tests and scripts can capture or silence the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from tokenmill.bench.fields import FIELDS, flatten, format_value, relative_difference
from tokenmill.bench.plan import CapacityPlan


def summary_table(labels: Sequence[str], summaries: Sequence[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for label in labels:
        table.add_column(label, justify="right")
    flats = [flatten(s) for s in summaries]
    for field in FIELDS:
        table.add_row(field.label, *(format_value(fl[field.key]) for fl in flats))
    table.add_row("Errors by kind", *(fl["errors"] for fl in flats))
    return table


def compare_table(names: Sequence[str], summaries: Sequence[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    flats = [flatten(s) for s in summaries]
    for field in FIELDS:
        base = flats[0][field.key]
        cells = [format_value(base)]
        for flat in flats[1:]:
            diff = relative_difference(base, flat[field.key])
            suffix = "" if diff is None else f" ({diff:+.1%})"
            cells.append(format_value(flat[field.key]) + suffix)
        table.add_row(field.label, *cells)
    table.add_row("Errors by kind", *(fl["errors"] for fl in flats))
    return table


def _limits(slo: dict[str, float | None]) -> str:
    return ", ".join(f"{k.removesuffix('_ms')} <= {v:g} ms" for k, v in slo.items() if v is not None)


def print_plan(console: Console, plan: CapacityPlan) -> None:
    table = Table(
        title=f"Capacity plan: SLO {_limits(plan.slo)}; a point passes at >= {plan.min_good_fraction:.0%} good"
    )
    for column in ("load", "sent", "good", "good fraction", "goodput (req/s)", "passes"):
        table.add_column(column, justify="right")
    for p in plan.points:
        table.add_row(
            p.label,
            str(p.num_sent),
            str(p.good_requests),
            f"{p.good_fraction:.1%}",
            f"{p.goodput:.3f}",
            "yes" if p.passes else "no",
        )
    console.print(table)
    if plan.replicas is None:
        console.print(
            "No load point meets the SLO: one replica cannot serve this workload within it.", soft_wrap=True
        )
        return
    console.print(
        f"One replica sustains {plan.per_replica_rate:.3f} req/s within the SLO (at {plan.chosen.label}); "
        f"{plan.target_qps:g} req/s needs {plan.replicas} replica(s).",
        soft_wrap=True,
    )
