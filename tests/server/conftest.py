"""Server fixtures: one shared `tokenmill serve` subprocess on the tiny Llama for the whole server test session."""

from __future__ import annotations

import pytest
from server_process import ServerProcess  # tests/server_process.py, shared with the bench tests

# Small context so every request (fuzzed ones too) generates a bounded number of tokens on CPU.
SHARED_ARGS = ("--max-model-len", "256", "--served-model-name", "tiny-llama", "--enable-auto-tool-choice",
               "--tool-call-parser", "hermes")


@pytest.fixture(scope="session")
def shared_server(tiny_llama_dir, tmp_path_factory):
    server = ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("shared_server") / "server.log", *SHARED_ARGS)
    yield server
    server.stop()
