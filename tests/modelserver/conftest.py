"""Fixtures: both bundled models exported once per session into a tmp repository, and a real server subprocess.

The server runs ``python -m tokenmill serve-models`` on a free loopback port; tests talk to it over HTTP.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # test_bad_input.py repeats this; one 224x224 fp32 image is 602,112 bytes, and about 3 MB as JSON text


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
    from tokenmill.modelserver.loadgen import ServerProcess

    server = ServerProcess(exported["repository"], extra_args=["--max-request-bytes", str(MAX_REQUEST_BYTES)],
                           log_path=exported["repository"] / "server.log", grpc=True)
    try:
        yield {"http": server.url.removeprefix("http://"), "grpc": server.grpc_address}
    finally:
        server.close()
