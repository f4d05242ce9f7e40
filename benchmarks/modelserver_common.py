"""Shared pieces of the modelserver benchmarks: a repository built once, a server subprocess, a load generator.

Requests are KServe v2 binary-tensor infer calls (what tritonclient sends), generated with asyncio + httpx.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.machine()} {os.cpu_count()} CPUs{gpu}, {platform.platform()}, python {platform.python_version()}"


def ensure_repository(path: Path, models: tuple[str, ...], hf_dir: Path | None = None) -> Path:
    """Export the bundled models (fp32 only) into ``path`` unless already there (``hf_dir``: a MiniLM copy)."""
    from tokenmill.modelserver.export import bundled_export_spec
    from tokenmill.modelserver.pipeline import export_to_repository

    for name in models:
        if not (path / name / "1" / "model.onnx").exists():
            export_to_repository(name, path, spec=bundled_export_spec(name, hf_dir), variants=())
    return path


def variant_repository(src: Path, dst: Path, model: str, **overrides) -> Path:
    """A one-model repository sharing ``src``'s graph (symlink) with config.yaml fields overridden."""
    (dst / model / "1").mkdir(parents=True, exist_ok=True)
    link = dst / model / "1" / "model.onnx"
    if not link.exists():
        link.symlink_to((src / model / "1" / "model.onnx").resolve())
    for extra in ("labels.txt",):
        if (src / model / extra).exists() and not (dst / model / extra).exists():
            (dst / model / extra).symlink_to((src / model / extra).resolve())
    config = yaml.safe_load((src / model / "config.yaml").read_text())
    config.update(overrides)
    (dst / model / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dst


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``tokenmill serve-models`` in a subprocess on a free loopback port."""

    def __init__(self, repository: Path, device: str = "cpu", extra_args: list[str] = (), root: Path = ROOT) -> None:
        """``root``: the checkout whose tokenmill serves (another one gives an A/B baseline in the same run)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "serve-models", "--repository", str(repository), "--port",
             str(self.port), "--device", device, *extra_args],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready after 180 s")
            time.sleep(0.3)

    def cpu_seconds(self) -> float:
        """User + system CPU of the server and its worker processes so far (Linux /proc): per-request CPU is a
        steadier A/B measure than throughput on a host shared with other jobs."""
        total, todo = 0.0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
        return total

    def mean_batch_size(self, model: str) -> tuple[float, float]:
        """(samples, executions) so far from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        total = count = 0.0
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            if family.name == "tokenmill_model_batch_size":
                for s in family.samples:
                    if s.labels.get("model") == model and s.name.endswith("_sum"):
                        total += s.value
                    elif s.labels.get("model") == model and s.name.endswith("_count"):
                        count += s.value
        return total, count

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def binary_body(feeds: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary-tensor request body and its headers."""
    from tokenmill.modelserver.tensors import datatype_of

    inputs = [{"name": k, "shape": list(v.shape), "datatype": datatype_of(v),
               "parameters": {"binary_data_size": v.nbytes}} for k, v in feeds.items()]
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode()
    body = header + b"".join(np.ascontiguousarray(v).tobytes() for v in feeds.values())
    return body, {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}


@dataclass
class LoadResult:
    mode: str  # "closed" (fixed concurrency) or "open" (Poisson arrivals at rate)
    level: float  # concurrency or offered requests/s
    requests: int
    failed: int
    duration_s: float
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_batch_size: float | None = None


def summarize(mode, level, latencies, failed, duration) -> LoadResult:
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return LoadResult(mode, level, len(latencies), failed, round(duration, 3), round(len(latencies) / duration, 2),
                      round(float(np.percentile(ms, 50)), 2), round(float(np.percentile(ms, 90)), 2),
                      round(float(np.percentile(ms, 99)), 2))


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict) -> float | None:
    start = time.perf_counter()
    reply = await client.post(url, content=body, headers=headers)
    return time.perf_counter() - start if reply.status_code == 200 else None


async def closed_loop(url: str, body: bytes, headers: dict, concurrency: int, seconds: float) -> LoadResult:
    """``concurrency`` clients each sending back-to-back for ``seconds``."""
    latencies: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds
    # Keep-alive for every client: with the default (20) the rest would reconnect on every request.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            nonlocal failed
            while time.perf_counter() < stop:
                took = await _post(client, url, body, headers)
                if took is None:
                    failed += 1
                else:
                    latencies.append(took)

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        duration = time.perf_counter() - start
    return summarize("closed", concurrency, latencies, failed, duration)


async def open_loop(url: str, body: bytes, headers: dict, rate: float, seconds: float, seed: int = 0) -> LoadResult:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``; latency includes any queueing."""
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    failed = 0
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=512, max_keepalive_connections=512)) as client:
        async def one():
            nonlocal failed
            took = await _post(client, url, body, headers)
            if took is None:
                failed += 1
            else:
                latencies.append(took)

        tasks = []
        start = time.perf_counter()
        next_at = start
        while next_at < start + seconds:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
            next_at += rng.exponential(1.0 / rate)
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize("open", rate, latencies, failed, duration)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    full = {"date": now.isoformat(timespec="seconds"), "machine": machine(),
            "load_average_at_start": payload.pop("load_average_at_start", None),
            "load_average_at_end": list(os.getloadavg()), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            **payload}
    path = RESULTS / f"{name}_{now.strftime('%Y-%m-%d_%H%M')}.json"
    path.write_text(json.dumps(full, indent=2))
    return path


class RawHttpConnection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: a fixed POST, read status + Content-Length body.

    The load generator must cost far less per request than the server; httpx costs about as much as the server
    does (the single-process httpx client was half of the "collapse" at 64 clients, see docs/MODELSERVER.md).
    """

    def __init__(self, host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self) -> int:
        """Send the request once; the response status (the connection reopens if the server closed it)."""
        await self.connect()
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _client_proc(url: str, body: bytes, headers: dict, clients: int, start_at: float, seconds: float,
                 kind: str, out: mp.Queue) -> None:
    """One load-generator process: ``clients`` keep-alive connections sending back to back."""

    async def main() -> tuple[list[float], int]:
        latencies: list[float] = []
        failed = 0
        if kind == "raw":
            from urllib.parse import urlsplit

            parts = urlsplit(url)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            connections = [RawHttpConnection(parts.hostname, parts.port, path, body, headers) for _ in range(clients)]
            session = None
        elif kind == "aiohttp":
            import aiohttp

            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 4),
                                            timeout=aiohttp.ClientTimeout(total=120))

            async def post() -> bool:
                async with session.post(url, data=body, headers=headers) as reply:
                    await reply.read()
                    return reply.status == 200
        else:
            import httpx

            limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
            session = httpx.AsyncClient(timeout=120, limits=limits)

            async def post() -> bool:
                return (await session.post(url, content=body, headers=headers)).status_code == 200

        async def worker(i: int) -> None:
            nonlocal failed
            while (now := time.time()) < start_at + seconds:
                try:
                    ok = (await connections[i].post()) == 200 if kind == "raw" else await post()
                except Exception:  # noqa: BLE001 - a dropped connection is a failed request, counted
                    ok = False
                    if kind == "raw":
                        await connections[i].close()  # reconnect on the next request
                if ok:
                    latencies.append(time.time() - now)
                else:
                    failed += 1

        if kind == "raw":  # connect before the clock starts: the window measures steady keep-alive traffic
            await asyncio.gather(*[c.connect() for c in connections])
        await asyncio.sleep(max(0.0, start_at - time.time()))
        await asyncio.gather(*[worker(i) for i in range(clients)])
        if kind == "raw":
            await asyncio.gather(*[c.close() for c in connections])
        else:
            await (session.close() if kind == "aiohttp" else session.aclose())
        return latencies, failed

    try:
        import uvloop  # the client's own loop overhead matters at thousands of requests/s

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(main()))


def drive(url: str, body: bytes, headers: dict, concurrency: int, seconds: float, procs: int = 2,
          kind: str = "raw") -> LoadResult:
    """``concurrency`` clients split over ``procs`` processes, all starting together; the merged summary."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = max(1, min(procs, concurrency))
    start_at = time.time() + 2.0 + 0.5 * procs  # after every process has imported its client
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    workers = [ctx.Process(target=_client_proc, args=(url, body, headers, n, start_at, seconds, kind, out))
               for n in shares]
    for w in workers:
        w.start()
    latencies, failed = [], 0
    for _ in workers:
        lat, fail = out.get(timeout=seconds + 180)
        latencies += lat
        failed += fail
    for w in workers:
        w.join(timeout=30)
    duration = max(seconds, max(latencies, default=0.0))  # requests started before the end may finish a bit late
    return summarize("closed", concurrency, latencies, failed, duration)
