"""Flattens a run summary into named, ordered fields shared by the console table, CSV, HTML and compare.

Each field has a label with its unit and a direction (lower or higher is better) for relative differences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LATENCY_METRICS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))
STATS = ("mean", "median", "p90", "p99", "max")


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    higher_is_better: bool | None  # None: neither (counts, settings)


FIELDS: tuple[Field, ...] = (
    Field("num_sent", "Requests sent", None),
    Field("num_completed", "Requests completed", True),
    Field("num_failed", "Requests failed", False),
    Field("num_not_sent", "Not sent (duration limit)", None),
    Field("duration_s", "Duration (s)", None),
    Field("request_throughput", "Request throughput (req/s)", True),
    Field("output_throughput", "Output token throughput (tok/s)", True),
    Field("total_token_throughput", "Total token throughput (tok/s)", True),
    Field("goodput", "Goodput (req/s within SLO)", True),
    Field("peak_concurrency", "Peak concurrency", None),
    Field("total_input_tokens", "Total input tokens", None),
    Field("total_output_tokens", "Total output tokens", None),
    *(
        Field(f"{key}.{stat}", f"{name} {stat} (ms)", False)
        for key, name in LATENCY_METRICS
        for stat in STATS
    ),
)


def flatten(summary: dict[str, Any]) -> dict[str, Any]:
    """Field key → value (None when not measured, e.g. goodput without --slo)."""
    out: dict[str, Any] = {}
    for field in FIELDS:
        key, _, stat = field.key.partition(".")
        value = summary.get(key)
        out[field.key] = (value or {}).get(stat) if stat else value
    out["errors"] = ", ".join(f"{k}={v}" for k, v in (summary.get("errors") or {}).items()) or "none"
    return out


def format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)


def relative_difference(base: Any, other: Any) -> float | None:
    """(other − base) / base, or None where undefined."""
    if not isinstance(base, int | float) or not isinstance(other, int | float) or base == 0:
        return None
    return (other - base) / abs(base)
