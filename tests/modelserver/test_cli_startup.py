"""`serve-models` says where it listens, defaults to `serve`'s port and shares `serve`'s flag names (issue 25)."""

from __future__ import annotations

import re
import select
import subprocess
import sys

import httpx

from tests.modelserver.conftest import REPO_ROOT
from tokenmill.cli import build_parser


def test_serve_models_shares_serve_defaults_and_flag_names(tmp_path):
    parser = build_parser()
    models = parser.parse_args(["serve-models", "--repository", str(tmp_path), "--max-request-bytes", "2048"])
    serve = parser.parse_args(["serve", "x"])
    assert models.port == serve.port == 8000
    assert models.max_request_bytes == 2048
    old_name = parser.parse_args(["serve-models", "--repository", str(tmp_path), "--max-body-bytes", "4096"])
    assert old_name.max_request_bytes == 4096


def test_serve_models_prints_where_it_listens(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "serve-models", "--repository", str(tmp_path), "--port", "0",
         "--device", "cpu"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)  # bounded: before the fix nothing is ever printed
        line = proc.stdout.readline() if ready else ""  # the announcement is the first line the server prints
        match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
        assert match, f"no 'listening on' line; got {line!r}"
        assert int(match.group(2)) != 0  # the real port the OS picked, not the 0 asked for
        assert httpx.get(f"{match.group(1)}/v2/health/live", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
