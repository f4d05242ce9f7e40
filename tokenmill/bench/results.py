"""Result documents: one JSON per ``bench serve`` (metadata, sweep, runs with summaries), its CSV, and loading.

Per-request records are stored only with --save-detailed; the HTML report gets them from memory.
"""

from __future__ import annotations

import csv
import json
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tokenmill.bench.fields import FIELDS, flatten
from tokenmill.bench.records import RequestRecord

SCHEMA = "tokenmill.bench.serve/1"


def command_line() -> str:
    """The command as typed: ``python -m tokenmill`` shows up as ``.../tokenmill/__main__.py`` in argv."""
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("__main__.py", "tokenmill"):
        return shlex.join(["tokenmill", *sys.argv[1:]])
    return shlex.join(sys.argv)


def make_metadata(
    target: dict[str, Any], dataset: dict[str, Any], label: str | None = None
) -> dict[str, Any]:
    from tokenmill import __version__

    return {
        "schema": SCHEMA,
        "label": label,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "tokenmill_version": __version__,
        "machine": f"{platform.node()} {platform.machine()} {platform.system()} python {platform.python_version()}",
        "target": target,
        "dataset": dataset,
    }


def make_run(
    label: str, load: dict[str, Any], summary: dict[str, Any], records: list[RequestRecord] | None
) -> dict[str, Any]:
    run: dict[str, Any] = {"label": label, "load": load, "summary": summary}
    if records is not None:
        run["requests"] = [r.to_dict() for r in records]
    return run


def make_document(
    metadata: dict[str, Any], sweep: dict[str, Any] | None, runs: list[dict[str, Any]]
) -> dict[str, Any]:
    return {"metadata": metadata, "sweep": sweep, "runs": runs}


def save_json(document: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def load_json(path: str | Path) -> dict[str, Any]:
    document = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("runs"), list) or not document["runs"]:
        raise ValueError(
            f"{path} is not a bench result: it must be a JSON object with a non-empty 'runs' list"
        )
    return document


def save_csv(document: dict[str, Any], path: str | Path) -> Path:
    """One row per run (sweep point): load settings, then every summary field."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = ["label", "request_rate", "burstiness", "max_concurrency", *(f.key for f in FIELDS), "errors"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for run in document["runs"]:
            row = {"label": run["label"], **run["load"], **flatten(run["summary"])}
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return path


def run_records(run: dict[str, Any]) -> list[RequestRecord] | None:
    if "requests" not in run:
        return None
    return [RequestRecord.from_dict(item) for item in run["requests"]]


def load_value(run: dict[str, Any], param: str | None) -> float | None:
    """The x value of a run on a load axis: its concurrency cap or its offered rate (None = unlimited)."""
    load = run["load"]
    if param == "concurrency":
        return load.get("max_concurrency")
    return load.get("request_rate")
