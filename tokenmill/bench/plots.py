"""Matplotlib figures for the HTML reports, returned as base64 PNG so the report stays one self-contained file.

Uses ``matplotlib.figure.Figure`` directly (no pyplot state), so plotting is safe to call from anywhere.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tokenmill.bench import metrics
from tokenmill.bench.records import RequestRecord

# (series name, records) and (series name, [(x, summary), ...]) are the two inputs the figures take.
RecordSeries = tuple[str, Sequence[RequestRecord]]
LoadSeries = tuple[str, Sequence[tuple[float, dict[str, Any]]]]


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _load_axis(ax, series: Sequence[LoadSeries], xlabel: str) -> None:
    """Label the load axis; a sweep spanning 8x or more (1, 4, 16, 64) reads better on a log2 scale."""
    xs = [x for _, points in series for x, _ in points if x is not None and x > 0]
    if xs and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ticks = sorted(set(xs))
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def latency_cdfs(series: Sequence[RecordSeries]) -> str:
    """Empirical CDFs of TTFT, TPOT, ITL and E2E, one line per series."""
    fig = Figure(figsize=(11, 7))
    getters = (
        ("TTFT", lambda rs: [metrics.ttft(r) for r in rs]),
        ("TPOT", lambda rs: [metrics.tpot(r) for r in rs]),
        ("ITL", lambda rs: [g for r in rs for g in metrics.itl(r)]),
        ("E2E latency", lambda rs: [metrics.e2e_latency(r) for r in rs]),
    )
    for slot, (title, get) in enumerate(getters, start=1):
        ax = fig.add_subplot(2, 2, slot)
        for name, records in series:
            values = np.sort([v * 1000.0 for v in get([r for r in records if r.ok]) if v is not None])
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=name)
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if title != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=7)
    return _png(fig)


def latency_vs_load(series: Sequence[LoadSeries], xlabel: str) -> str:
    """Mean and p99 of TTFT and TPOT against the load axis."""
    fig = Figure(figsize=(11, 4))
    for slot, (key, title) in enumerate((("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")), start=1):
        ax = fig.add_subplot(1, 2, slot)
        for name, points in series:
            xs = [x for x, _ in points]
            for stat, style in (("mean", "o-"), ("p99", "s--")):
                ys = [s[key][stat] if s[key][stat] is not None else np.nan for _, s in points]
                ax.plot(xs, ys, style, label=f"{name} {stat}")
        ax.set_title(f"{title} vs load")
        ax.set_ylabel("ms")
        _load_axis(ax, series, xlabel)
    return _png(fig)


def percentiles_vs_load(points: Sequence[tuple[float, dict[str, Any]]], xlabel: str) -> str:
    """p50, p90 and p99 of TTFT, TPOT and ITL against the load axis (one run or one sweep)."""
    fig = Figure(figsize=(14, 4.5))
    points = sorted(points, key=lambda point: point[0])  # an unlimited run sits at its achieved rate
    xs = [x for x, _ in points]
    for slot, (key, title) in enumerate((("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")), start=1):
        ax = fig.add_subplot(1, 3, slot)
        for stat, style in (("median", "o-"), ("p90", "^-."), ("p99", "s--")):
            ys = [s[key][stat] if s[key][stat] is not None else np.nan for _, s in points]
            ax.plot(xs, ys, style, label="p50" if stat == "median" else stat)
        ax.set_title(f"{title} percentiles vs load")
        ax.set_ylabel("ms")
        _load_axis(ax, [("run", points)], xlabel if slot == 2 else "")  # one axis label under the middle panel
    fig.tight_layout()
    return _png(fig)


def throughput_vs_load(series: Sequence[LoadSeries], xlabel: str) -> str:
    """Output token throughput, and request throughput with goodput, against the load axis."""
    fig = Figure(figsize=(11, 4))
    ax_tok, ax_req = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, points in series:
        xs = [x for x, _ in points]
        ax_tok.plot(xs, [s["output_throughput"] for _, s in points], "o-", label=name)
        ax_req.plot(xs, [s["request_throughput"] for _, s in points], "o-", label=f"{name} throughput")
        goodput = [s["goodput"] for _, s in points]
        if any(g is not None for g in goodput):
            ax_req.plot(xs, [np.nan if g is None else g for g in goodput], "s--", label=f"{name} goodput")
    ax_tok.set_title("Output token throughput vs load")
    ax_tok.set_ylabel("tokens/s")
    ax_req.set_title("Request throughput and goodput vs load")
    ax_req.set_ylabel("requests/s")
    for ax in (ax_tok, ax_req):
        _load_axis(ax, series, xlabel)
    return _png(fig)


def timeline(records: Sequence[RequestRecord], title: str = "Request timeline") -> str:
    """One horizontal bar per request: waiting for the first token, then streaming; failures in red."""
    fig = Figure(figsize=(11, max(3.0, min(8.0, 0.05 * len(records) + 2))))
    ax = fig.add_subplot(1, 1, 1)
    for row, record in enumerate(sorted(records, key=lambda r: r.start)):
        if not record.ok:
            ax.hlines(row, record.start, record.end, colors="tab:red", linewidth=2)
            continue
        first = record.first_token if record.first_token is not None else record.end
        ax.hlines(row, record.start, first, colors="tab:orange", linewidth=2)
        ax.hlines(row, first, record.end, colors="tab:blue", linewidth=2)
    ax.set_title(f"{title} (orange: waiting for first token, blue: streaming, red: failed)")
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("request (by start time)")
    ax.grid(alpha=0.3)
    return _png(fig)


def metric_bars(names: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    """Side-by-side bars of the headline numbers of several runs (for compare without per-request data)."""
    panels = (
        ("Output tokens/s", lambda s: s["output_throughput"]),
        ("Requests/s", lambda s: s["request_throughput"]),
        ("TTFT p50 / p99 (ms)", lambda s: (s["ttft_ms"]["median"], s["ttft_ms"]["p99"])),
        ("TPOT p50 / p99 (ms)", lambda s: (s["tpot_ms"]["median"], s["tpot_ms"]["p99"])),
    )
    fig = Figure(figsize=(11, 6))
    positions = np.arange(len(names))
    for slot, (title, get) in enumerate(panels, start=1):
        ax = fig.add_subplot(2, 2, slot)
        values = [get(s) for s in summaries]
        if isinstance(values[0], tuple):
            for offset, (stat, idx) in ((-0.2, ("p50", 0)), (0.2, ("p99", 1))):
                ax.bar(
                    positions + offset,
                    [np.nan if v[idx] is None else v[idx] for v in values],
                    0.4,
                    label=stat,
                )
            ax.legend(fontsize=7)
        else:
            ax.bar(positions, [np.nan if v is None else v for v in values], 0.6)
        ax.set_xticks(positions, names, fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    return _png(fig)
