"""A closed-loop load generator for the model server: keep-alive HTTP/1.1 clients over several processes.

Used by ``tokenmill bench-model --search`` and benchmarks/modelserver_*.py. Loopback targets, bounded by seconds.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

CHECKOUT = Path(__file__).resolve().parents[2]  # the tree this tokenmill is imported from


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``tokenmill serve-models`` in a subprocess on a free loopback port."""

    def __init__(self, repository: Path, device: str = "cpu", extra_args: list[str] = (), root: Path = CHECKOUT,
                 log_path: Path | None = None, grpc: bool = False) -> None:
        """``root``: the checkout whose tokenmill serves (another one gives an A/B baseline in the same run).
        ``log_path``: where the server's output goes (by default only stderr is kept, for the error on early exit).
        ``grpc``: also serve KServe v2 gRPC on a free port (``grpc_address``)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{free_port()}" if grpc else None
        grpc_args = ["--grpc-port", self.grpc_address.rsplit(":", 1)[1]] if grpc else []
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenmill", "serve-models", "--repository", str(repository), "--port",
             str(self.port), "--device", device, *grpc_args, *extra_args],
            cwd=root, env=env, stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if self._log else subprocess.PIPE,
        )
        try:
            self._wait_ready(timeout_s=180)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                output = self.log_path.read_text(errors="replace") if self._log else self.proc.stderr.read().decode()
                raise RuntimeError(f"server exited: {output[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout_s:.0f} s")
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
            self.proc.wait()
        if self._log:
            self._log.close()



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


def _client_proc(url: str, body: bytes, headers: dict, clients: int, start: _StartSignal, seconds: float,
                 kind: str, out: mp.Queue) -> None:
    """One load-generator process: ``clients`` keep-alive connections sending back to back from the common start."""

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
        start_at = start.wait_for_start()  # blocks the loop: nothing else runs in it yet
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


class _StartSignal:
    """The clients' common start: each process reports ready (client imported, raw connections open), then all
    begin at one wall-clock instant the parent sets once the last is ready. A fixed delay instead (it was 2-3 s)
    waited needlessly on every level when the clients were ready sooner, and started late ones mid-window."""

    def __init__(self, ctx: Any, procs: int, timeout_s: float = 180.0) -> None:
        self.ready, self.go = ctx.Barrier(procs + 1, timeout=timeout_s), ctx.Event()
        self.start_at, self.timeout_s = ctx.Value("d", 0.0), timeout_s

    def wait_for_start(self) -> float:
        """In a client process: report ready, wait for the parent's start, return its time.time()."""
        self.ready.wait()
        if not self.go.wait(self.timeout_s):
            raise TimeoutError("the load generator's parent never started the clients")
        return self.start_at.value

    def start_when_ready(self) -> None:
        """In the parent: once every client is ready, start them all a moment from now."""
        self.ready.wait()
        self.start_at.value = time.time() + 0.05
        self.go.set()


def drive(url: str, body: bytes, headers: dict, concurrency: int, seconds: float, procs: int = 2,
          kind: str = "raw") -> LoadResult:
    """``concurrency`` clients split over ``procs`` processes, all starting together; the merged summary."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = max(1, min(procs, concurrency))
    start = _StartSignal(ctx, procs)
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    workers = [ctx.Process(target=_client_proc, args=(url, body, headers, n, start, seconds, kind, out))
               for n in shares]
    for w in workers:
        w.start()
    start.start_when_ready()
    latencies, failed = [], 0
    for _ in workers:
        lat, fail = out.get(timeout=seconds + 180)
        latencies += lat
        failed += fail
    for w in workers:
        w.join(timeout=30)
    duration = max(seconds, max(latencies, default=0.0))  # requests started before the end may finish a bit late
    return summarize("closed", concurrency, latencies, failed, duration)
