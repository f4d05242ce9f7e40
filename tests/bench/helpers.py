"""Shared helpers for the bench tests: run the CLI in-process and read back what it wrote."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from tokenmill.cli import main


def run_bench(tmp_path: Path, base_url: str, *flags: str, name: str = "run") -> dict[str, Any]:
    """``tokenmill bench serve`` against ``base_url``; returns the JSON it wrote (asserting all 3 files exist)."""
    argv = [
        "bench",
        "serve",
        "--base-url",
        base_url,
        "--no-progress",
        "--result-dir",
        str(tmp_path),
        "--result-name",
        name,
        *flags,
    ]
    assert main(argv) == 0
    for suffix in ("json", "csv", "html"):
        assert (tmp_path / f"{name}.{suffix}").is_file()
    return json.loads((tmp_path / f"{name}.json").read_text())


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
