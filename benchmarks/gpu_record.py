"""The JSON record each GPU probe in benchmarks/ writes: what ran, on which device, when and with which command."""

from __future__ import annotations

import datetime as dt
import json
import os
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


def probe_device(dry_run: bool) -> str:
    """"cuda", or "cpu" for a probe's ``--dry-run`` (its Triton kernels in the interpreter: TRITON_INTERPRET=1 must
    be set before triton is imported); exits with the reason when neither is possible."""
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 (the Triton kernels run in its interpreter)")
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --dry-run under TRITON_INTERPRET=1)")
    return "cuda"
