"""Server fixtures: one shared `tokenmill serve` subprocess on the tiny Llama for the whole server test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from server_process import ServerProcess  # noqa: E402

# Small context so every request (fuzzed ones too) generates a bounded number of tokens on CPU.
SHARED_ARGS = ("--max-model-len", "256", "--served-model-name", "tiny-llama")


@pytest.fixture(scope="session")
def shared_server(tiny_llama_dir, tmp_path_factory):
    server = ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("shared_server") / "server.log", *SHARED_ARGS)
    yield server
    server.stop()
