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


def run_compare(args: argparse.Namespace, console: Console | None = None) -> int:
    console = console or Console()
    if len(args.runs) < 2:
        raise ValueError(f"bench compare needs at least 2 result files (got {len(args.runs)})")
    documents = [load_json(path) for path in args.runs]
    names = run_names(args.runs, documents)
    for point in range(min(len(d["runs"]) for d in documents)):
        summaries = [d["runs"][point]["summary"] for d in documents]
        title = f"bench compare — load point {point + 1}: {documents[0]['runs'][point]['label']}"
        console.print(compare_table(names, summaries, title))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render_compare_report(names, documents), encoding="utf-8")
    console.print(f"Wrote {output}")
    return 0
