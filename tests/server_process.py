"""Start `python -m tokenmill serve` as a real subprocess on a free loopback port and wait until it serves.

The server binds port 0 itself and logs the URL it got, so there is no window in which another process can
take a port picked by the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

_URL_RE = re.compile(r"serving at (http://127\.0\.0\.1:\d+)")
REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    def __init__(self, model_dir: Path | None, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        """``model_dir`` None: no positional model (``args`` then gives e.g. ``--random-weights PRESET``)."""
        self.log_path = log_path
        command = [
            sys.executable, "-m", "tokenmill", "serve", *([str(model_dir)] if model_dir is not None else []),
            "--host", "127.0.0.1", "--port", "0", "--device", "cpu", *args,
        ]
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.url = self._wait_for_url(timeout=180.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _URL_RE.search(self.log())
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before serving:\n{self.log()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start within {timeout}s:\n{self.log()}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120.0, **kwargs)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus text exposition."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{key}="{val}"' in label_text for key, val in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(f"metric {name} {labels} not found")
    return total
