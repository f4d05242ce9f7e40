"""Test helpers: start a gateway or a stub backend as a real subprocess on a free loopback port, and wait.

Every process started here is stopped by the context manager that started it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tokenmill.gateway.pools import die_with_parent

REPO = Path(__file__).resolve().parents[2]
STUB = Path(__file__).resolve().parent / "stub_server.py"
STUB_COMMAND = ["{python}", str(STUB), "--host", "{host}", "--port", "{port}", "--name", "{name}"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = predicate()
            if last:
                return last
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def stub_backend(
    name: str, token_delay: float = 0.0, api_key: str | None = None, port: int | None = None
) -> Iterator[str]:
    """An external stand-in backend (on ``port``, or a free one); yields its base URL."""
    port = port or free_port()
    cmd = [sys.executable, str(STUB), "--port", str(port), "--name", name, "--token-delay", str(token_delay)]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health", timeout=1).status_code == 200, 60, f"stub {name}")
        yield url
    finally:
        _stop(proc)


class GatewayProcess:
    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.url = url
        self.proc = proc
        self.log_path = log_path

    def status(self) -> dict:
        return httpx.get(f"{self.url}/gateway/status", timeout=5).json()

    def pool(self, name: str) -> dict:
        return next(p for p in self.status()["pools"] if p["name"] == name)

    def ready_replicas(self, name: str) -> list[dict]:
        return [r for r in self.pool(name)["replicas"] if r["state"] == "ready"]

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_gateway(
    config: dict[str, Any],
    tmp_path: Path,
    startup_timeout_s: float = 60.0,
    wait_healthy: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[GatewayProcess]:
    """Write ``config`` as YAML, start ``python -m tokenmill gateway`` on a free port, wait for /health to answer
    (503 while a pool is still starting or broken; with ``wait_healthy``, wait for 200: every model can serve)."""
    port = free_port()
    config = {"host": "127.0.0.1", "port": port, "log_dir": str(tmp_path / "replica-logs"), **config}
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "gateway.log"
    # keep a PYTHONPATH the caller set (a --target site on the GPU box), the repo first
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "gateway", "--config", str(config_path)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
    gateway = GatewayProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gateway.log()}")
            status = httpx.get(f"{gateway.url}/health", timeout=1).status_code
            return status == 200 or (not wait_healthy and status == 503)

        wait_until(up, startup_timeout_s, "the gateway's /health")
        yield gateway
    finally:
        _stop(proc, grace_s=30.0)


def wait_ready(gateway: GatewayProcess, pool: str, count: int, timeout_s: float) -> list[dict]:
    return wait_until(
        lambda: (r := gateway.ready_replicas(pool)) and len(r) >= count and r,
        timeout_s,
        f"{count} ready {pool}",
    )


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of samples of ``name`` whose labels include ``labels`` in Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
