"""Acceptance 3 (fuzzing): schemathesis against the live server's /openapi.json finds no 5xx.

Bounded: coverage + fuzzing phases, a few hundred cases, a fixed seed; the shared server's small max_model_len
keeps every accepted generation short.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def test_schemathesis_finds_no_server_errors(shared_server, tmp_path):
    command = [
        str(SCHEMATHESIS), "run", shared_server.url + "/openapi.json",
        "--checks", "not_a_server_error",
        "--phases", "coverage,fuzzing",
        "--max-examples", "12",
        "--workers", "1",
        "--seed", "1",
        "--no-shrink",
        "--generation-database", "none",
        "--request-timeout", "60",
        "--no-color",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=110, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "passed" in output
    health = shared_server.client().get("/health")
    assert health.status_code == 200
