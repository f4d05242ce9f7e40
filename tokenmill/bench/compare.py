"""``tokenmill bench compare RUN.json ...``: one console table and one HTML report, side by side.

The first file is the baseline; every other value shows its relative difference to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from tokenmill.bench.console import compare_table
from tokenmill.bench.html_report import render_compare_report
from tokenmill.bench.results import load_json


def run_names(paths: list[str], documents: list[dict]) -> list[str]:
    """Each run's --label, else its file name; made unique so table columns never collide."""
    names: list[str] = []
    for path, document in zip(paths, documents, strict=True):
        name = document["metadata"].get("label") or Path(path).stem
        while name in names:
            name += "'"
        names.append(name)
    return names


def workload_warnings(names: list[str], documents: list[dict]) -> list[str]:
    """Differences that make a comparison unfair: another dataset, other load points, other output totals."""
    warnings = []
    base_name, base = names[0], documents[0]
    for name, doc in zip(names[1:], documents[1:], strict=True):
        if doc["metadata"].get("dataset") != base["metadata"].get("dataset"):
            warnings.append(f"{name} ran a different dataset than {base_name}")
        if [r["load"] for r in doc["runs"]] != [r["load"] for r in base["runs"]]:
            warnings.append(f"{name} ran different load points than {base_name}")
        for point, (a, b) in enumerate(zip(base["runs"], doc["runs"], strict=False), start=1):
            ours, theirs = a["summary"]["total_output_tokens"], b["summary"]["total_output_tokens"]
            if ours != theirs:
                warnings.append(
                    f"load point {point}: {name} generated {theirs} output tokens, {base_name} {ours} "
                    "(use --ignore-eos so both generate the same number)"
                )
    return warnings


def run_compare(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    if len(args.runs) < 2:
        raise ValueError(f"bench compare needs at least 2 result files (got {len(args.runs)})")
    documents = [load_json(path) for path in args.runs]
    names = run_names(args.runs, documents)
    warnings = workload_warnings(names, documents)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    for point in range(min(len(d["runs"]) for d in documents)):
        summaries = [d["runs"][point]["summary"] for d in documents]
        title = f"bench compare — load point {point + 1}: {documents[0]['runs'][point]['label']}"
        console.print(compare_table(names, summaries, title))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_compare_report(names, documents, warnings), encoding="utf-8")
    console.print(f"Wrote {output}")
    return 0
