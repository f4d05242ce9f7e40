"""Self-contained HTML reports (inline CSS, base64 PNG plots) for one ``bench serve`` run or a comparison.

The tables come from fields.py and the figures from plots.py; nothing is fetched when the file is opened.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from tokenmill.bench import plots
from tokenmill.bench.definitions import DEFINITIONS
from tokenmill.bench.fields import FIELDS, flatten, format_value, relative_difference
from tokenmill.bench.records import RequestRecord
from tokenmill.bench.results import load_value, run_records

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.better{color:#0a7a0a}.worse{color:#b00}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
code{background:#f4f4f4;padding:1px 4px}
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<h3>{html.escape(alt)}</h3><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _definitions() -> str:
    rows = [(html.escape(name), html.escape(text)) for name, text in DEFINITIONS]
    return "<h2>Definitions (as computed)</h2>" + _table(["metric", "definition"], rows)


def _metadata(meta: dict[str, Any]) -> str:
    rows = [(html.escape(k), f"<code>{html.escape(str(v))}</code>") for k, v in meta.items()]
    return _table(["", ""], rows)


def _axis(document: dict[str, Any]) -> tuple[str | None, str]:
    param = (document.get("sweep") or {}).get("param")
    if param == "concurrency":
        return param, "max concurrency"
    return param, "offered request rate (req/s; unlimited runs placed at their achieved rate)"


def _load_points(document: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    param, _ = _axis(document)
    points = []
    for run in document["runs"]:
        x = load_value(run, param)
        points.append((run["summary"]["request_throughput"] if x is None else x, run["summary"]))
    return points


def _summary_table(labels: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
    flats = [flatten(s) for s in summaries]
    rows = [[html.escape(f.label), *(format_value(fl[f.key]) for fl in flats)] for f in FIELDS]
    rows.append(["Errors by kind", *(html.escape(fl["errors"]) for fl in flats)])
    return _table(["metric", *labels], rows)


def _percentile_table(document: dict[str, Any], points: Sequence[tuple[float, dict[str, Any]]]) -> str:
    """Per load point: offered load, what was achieved, goodput, and the latency percentiles."""
    headers = ["load point", "output tok/s", "req/s", "goodput req/s"]
    keys = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"))
    stats = (("median", "p50"), ("p90", "p90"), ("p99", "p99"))
    headers += [f"{name} {label} ms" for _, name in keys for _, label in stats]
    rows = []
    for run, (_, summary) in zip(document["runs"], points, strict=True):
        row = [html.escape(run["label"]), format_value(summary["output_throughput"]),
               format_value(summary["request_throughput"]), format_value(summary["goodput"])]
        row += [format_value(summary[key][stat]) for key, _ in keys for stat, _ in stats]
        rows.append(row)
    return _table(headers, rows)


def render_serve_report(document: dict[str, Any], records: Sequence[Sequence[RequestRecord]]) -> str:
    """One run or one sweep; ``records`` holds each run's per-request records (in memory or from JSON)."""
    meta = document["metadata"]
    runs = document["runs"]
    labels = [run["label"] for run in runs]
    _, xlabel = _axis(document)
    body = [_metadata(meta), "<h2>Summary</h2>", _summary_table(labels, [r["summary"] for r in runs])]
    body.append("<h2>Plots</h2>")
    body.append(_img(plots.latency_cdfs(list(zip(labels, records, strict=True))), "Latency CDFs"))
    points = _load_points(document)
    body.insert(3, "<h2>Latency percentiles against load</h2>" + _percentile_table(document, points))
    body.append(_img(plots.percentiles_vs_load(points, xlabel), "Latency percentiles vs load"))
    body.append(_img(plots.latency_vs_load([("run", points)], xlabel), "TTFT and TPOT vs load"))
    body.append(_img(plots.throughput_vs_load([("run", points)], xlabel), "Throughput vs load"))
    busiest = max(range(len(runs)), key=lambda i: runs[i]["summary"]["peak_concurrency"])
    body.append(_img(plots.timeline(records[busiest], f"Timeline of {labels[busiest]}"), "Request timeline"))
    body.append(_definitions())
    return _page(
        f"tokenmill bench serve: {meta.get('label') or meta['target'].get('base_url', '')}", "".join(body)
    )


def _diff_cell(base: Any, other: Any, higher_is_better: bool | None) -> str:
    text = format_value(other)
    diff = relative_difference(base, other)
    if diff is None:
        return text
    css = ""
    if higher_is_better is not None and diff != 0:
        css = "better" if (diff > 0) == higher_is_better else "worse"
    return f"{text} <span class='{css}'>({diff:+.1%})</span>"


def compare_rows(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, list[Any], list[float | None]]]:
    """(label, values, relative difference of each value against the first) per field."""
    flats = [flatten(s) for s in summaries]
    rows = []
    for field in FIELDS:
        values = [fl[field.key] for fl in flats]
        rows.append((field.label, values, [relative_difference(values[0], v) for v in values]))
    return rows


def render_compare_report(
    names: Sequence[str], documents: Sequence[dict[str, Any]], warnings: Sequence[str] = ()
) -> str:
    """Side by side: per load point a table (baseline = first file) and overlaid plots."""
    body = [
        "<p>Relative differences are against the first run: (other − first) / first. "
        "<span class='better'>green</span> is better, <span class='worse'>red</span> worse.</p>"
    ]
    meta_rows = [
        (
            html.escape(n),
            html.escape(str(d["metadata"].get("target", {}).get("base_url", ""))),
            html.escape(str(d["metadata"].get("date", ""))),
            f"<code>{html.escape(str(d['metadata'].get('command', '')))}</code>",
        )
        for n, d in zip(names, documents, strict=True)
    ]
    body.append(_table(["run", "target", "date", "command"], meta_rows))
    if warnings:
        items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
        body.append(f"<p class='worse'>Workloads differ; read the numbers with care:</p><ul>{items}</ul>")
    num_points = min(len(d["runs"]) for d in documents)
    for point in range(num_points):
        runs = [d["runs"][point] for d in documents]
        summaries = [r["summary"] for r in runs]
        body.append(f"<h2>Load point {point + 1}: {html.escape(runs[0]['label'])}</h2>")
        rows = []
        for field in FIELDS:
            values = [flatten(s)[field.key] for s in summaries]
            cells = [format_value(values[0])] + [
                _diff_cell(values[0], v, field.higher_is_better) for v in values[1:]
            ]
            rows.append([html.escape(field.label), *cells])
        rows.append(["Errors by kind", *(html.escape(flatten(s)["errors"]) for s in summaries)])
        body.append(_table(["metric", *names], rows))
    body.append("<h2>Plots</h2>")
    first_points = [d["runs"][0]["summary"] for d in documents]
    body.append(_img(plots.metric_bars(names, first_points), "Headline numbers (first load point)"))
    if any(len(d["runs"]) > 1 for d in documents):
        _, xlabel = _axis(documents[0])
        series = [(n, _load_points(d)) for n, d in zip(names, documents, strict=True)]
        body.append(_img(plots.latency_vs_load(series, xlabel), "TTFT and TPOT vs load"))
        body.append(_img(plots.throughput_vs_load(series, xlabel), "Throughput vs load"))
    detailed = [run_records(d["runs"][0]) for d in documents]
    if all(r is not None for r in detailed):
        body.append(
            _img(
                plots.latency_cdfs(list(zip(names, detailed, strict=True))), "Latency CDFs (first load point)"
            )
        )
    body.append(_definitions())
    return _page("tokenmill bench compare: " + " vs ".join(names), "".join(body))
