"""The JSON record each GPU probe in benchmarks/ writes: what ran, on which device, when and with which command."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch


def write_record(path: Path, benchmark: str, **fields: Any) -> Path:
    """Write ``fields`` under the common header (benchmark, date, device, torch, command); a field given here
    (e.g. ``device``) replaces the header's."""
    record = {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": shlex.join(["python3", *sys.argv]),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
