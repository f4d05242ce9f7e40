"""Fixtures: both bundled models exported once per session into a tmp repository, and a real server subprocess.

The server runs ``python -m tokenmill serve-models`` on a free loopback port; tests talk to it over HTTP.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # test_bad_input.py repeats this; one 224x224 fp32 image is 602,112 bytes, and about 3 MB as JSON text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict:
    """Run the export pipeline for both bundled models (FP16 + INT8 variants, small calibration)."""
    from tokenmill.modelserver.pipeline import copy_version, export_to_repository

    repo = tmp_path_factory.mktemp("model_repository")
    warnings: list[str] = []  # what the pipeline says loudly (a variant failing its agreement threshold)
    common = dict(variants=("fp16", "int8"), warn=warnings.append)
    reports = {
        "classifier": export_to_repository("classifier", repo, calibration_size=4, **common),
        "sentiment": export_to_repository("sentiment", repo, calibration_size=16, **common),
    }
    copy_version(repo, "sentiment", 1, 2)  # a second version of the same graph, to exercise version routing
    return {"repository": repo, "reports": reports, "warnings": warnings}


@pytest.fixture(scope="session")
def grpc_server(server_ports) -> str:
    """host:port of the same server's KServe v2 gRPC endpoint."""
    return server_ports["grpc"]


@pytest.fixture(scope="session")
def server(server_ports) -> str:
    """host:port of a live model server (HTTP) over the exported repository."""
    return server_ports["http"]


@pytest.fixture(scope="session")
def server_ports(exported) -> dict[str, str]:
    port, grpc_port = free_port(), free_port()
    log = open(exported["repository"] / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "serve-models", "--repository", str(exported["repository"]),
         "--port", str(port), "--device", "cpu", "--max-request-bytes", str(MAX_REQUEST_BYTES), "--grpc-port", str(grpc_port)],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early: {(exported['repository'] / 'server.log').read_text()}")
            try:
                if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready within 120 s")
            time.sleep(0.3)
        yield {"http": url, "grpc": f"127.0.0.1:{grpc_port}"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
