"""Latency the gateway adds per request: the same requests sent straight to a backend and through
`tokenmill gateway`, interleaved, one at a time; p50/p99 of each and of the paired differences.

    python benchmarks/gateway_overhead.py                          # stand-in backend: isolates gateway cost
    python benchmarks/gateway_overhead.py --backend serve --model DIR   # a real `tokenmill serve` backend
Writes benchmarks/results/gateway_overhead-<backend>-<UTC date>.json with date, machine and command.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / "tests" / "gateway" / "stub_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


@contextlib.contextmanager
def process(cmd: list[str], url: str, timeout_s: float) -> Iterator[None]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(url, proc, timeout_s)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p90_ms": round(percentile(values, 90) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3),
    }


def timed_post(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    resp = client.post(url, json=body)
    elapsed = time.perf_counter() - start
    resp.raise_for_status()
    return elapsed


def timed_first_byte(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        chunks = resp.iter_raw()
        next(chunks)
        elapsed = time.perf_counter() - start
        for _ in chunks:
            pass
    return elapsed


def measure(direct: str, gateway: str, body: dict, n: int, warmup: int, stream: bool) -> dict:
    probe = timed_first_byte if stream else timed_post
    direct_s: list[float] = []
    gateway_s: list[float] = []
    with httpx.Client(timeout=120) as client:  # keep-alive on both paths, as a real client would
        for _ in range(warmup):
            probe(client, direct, body)
            probe(client, gateway, body)
        for i in range(n):
            # Alternate which goes first so drift (other load, thermal) hits both sides alike.
            order = [(direct, direct_s), (gateway, gateway_s)]
            for url, sink in order if i % 2 == 0 else reversed(order):
                sink.append(probe(client, url, body))
    added = [g - d for g, d in zip(gateway_s, direct_s, strict=True)]
    return {
        "direct": summary_ms(direct_s),
        "through_gateway": summary_ms(gateway_s),
        "added_per_request_paired": summary_ms(added),
        "added_p50_ms": round((percentile(gateway_s, 50) - percentile(direct_s, 50)) * 1000, 3),
        "added_p99_ms": round((percentile(gateway_s, 99) - percentile(direct_s, 99)) * 1000, 3),
    }


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            # uvicorn uses these when importable (uvicorn[standard]); they change the gateway's cost.
            "uvloop": importlib.util.find_spec("uvloop") is not None,
            "httptools": importlib.util.find_spec("httptools") is not None}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["stub", "serve"], default="stub")
    parser.add_argument("--model", default=None, help="model for --backend serve (default: embedded SmolLM2)")
    parser.add_argument("--requests", type=int, default=300, help="requests per path")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--out", default=None, help="result JSON path (default: benchmarks/results/...)")
    parser.add_argument("--tag", default="", help="suffix for the default result file name")
    args = parser.parse_args()

    backend_port, gateway_port = free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}"
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    name = "bench"
    if args.backend == "stub":
        backend_cmd = [sys.executable, str(STUB), "--port", str(backend_port), "--name", name]
    else:
        backend_cmd = [sys.executable, "-m", "tokenmill", "serve", *([args.model] if args.model else []),
                       "--port", str(backend_port), "--served-model-name", name, "--device", "cpu"]  # fmt: skip
    config = {"host": "127.0.0.1", "port": gateway_port,
              "models": [{"name": name, "kind": "external", "urls": [backend_url]}]}  # fmt: skip
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "gateway.yaml"
        config_path.write_text(yaml.safe_dump(config))
        gateway_cmd = [sys.executable, "-m", "tokenmill", "gateway", "--config", str(config_path),
                       "--log-level", "warning"]  # fmt: skip
        with process(backend_cmd, backend_url, 300), process(gateway_cmd, gateway_url, 120):
            body = {"model": name, "prompt": "Hello there", "max_tokens": args.max_tokens, "temperature": 0}
            for label, path, stream in (
                ("completions", "/v1/completions", False),
                ("completions_stream_first_byte", "/v1/completions", True),
            ):
                req = {**body, "stream": stream}
                results[label] = measure(f"{backend_url}{path}", f"{gateway_url}{path}", req, args.requests,
                                         args.warmup, stream)  # fmt: skip
                print(label, json.dumps(results[label], indent=2))
    now = dt.datetime.now(dt.UTC)
    record = {
        "benchmark": "gateway_overhead",
        "date": now.isoformat(timespec="seconds"),
        "machine": machine(),
        "command": " ".join(
            shlex.quote(a) for a in ["python", "benchmarks/gateway_overhead.py", *sys.argv[1:]]
        ),
        "backend": args.backend,
        "model": args.model,
        "requests_per_path": args.requests,
        "max_tokens": args.max_tokens,
        "concurrency": 1,
        "results": results,
    }
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"gateway_overhead-{args.backend}{'-' + args.tag if args.tag else ''}-{now.strftime('%Y%m%d')}.json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
