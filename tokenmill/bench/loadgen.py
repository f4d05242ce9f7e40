"""Drives a workload against a target: warmup, arrival schedule, concurrency cap, duration limit, sweeps.

One httpx.AsyncClient (HTTP/1.1 keep-alive) whose pool is as large as the allowed concurrency, so the
client never queues a request the arrival process has released.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, replace

import httpx
from tqdm import tqdm

from tokenmill.bench.arrivals import arrival_offsets
from tokenmill.bench.client import Target, send_request
from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.records import RequestRecord

SWEEP_PARAMS = ("concurrency", "rate")


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 0
    duration_s: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency ({self.max_concurrency}) must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"--warmup ({self.warmup}) must be >= 0 requests")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration ({self.duration_s}) must be > 0 seconds")

    def describe(self) -> dict[str, float | int | None]:
        rate = None if math.isinf(self.request_rate) else self.request_rate
        return {"request_rate": rate, "burstiness": self.burstiness, "max_concurrency": self.max_concurrency}


@dataclass
class LoadResult:
    load: LoadConfig
    records: list[RequestRecord]
    num_not_sent: int  # requests the --duration limit stopped before they were sent


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``"concurrency=1,4,16"`` or ``"rate=1,2,inf"`` → (param, values)."""
    name, sep, values = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in SWEEP_PARAMS:
        raise ValueError(f"--sweep {text!r} must look like concurrency=1,4,16 or rate=1,2,4")
    try:
        parsed = [float(v) for v in values.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--sweep values in {text!r} must be numbers") from exc
    if not parsed or any(not v > 0 for v in parsed):
        raise ValueError(f"--sweep {name} values in {text!r} must be > 0")
    if name == "concurrency" and any(v != int(v) or math.isinf(v) for v in parsed):
        raise ValueError(f"--sweep concurrency values in {text!r} must be whole numbers")
    return name, parsed


def sweep_loads(base: LoadConfig, param: str, values: list[float]) -> list[LoadConfig]:
    if param == "concurrency":
        return [replace(base, max_concurrency=int(v)) for v in values]
    return [replace(base, request_rate=v) for v in values]


def _pool_limits(load: LoadConfig, num_requests: int) -> httpx.Limits:
    size = load.max_concurrency or num_requests
    return httpx.Limits(max_connections=max(1, size), max_keepalive_connections=max(1, size))


async def _run_point(
    client: httpx.AsyncClient, target: Target, requests: list[BenchRequest], load: LoadConfig, desc: str
) -> LoadResult:
    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, load.seed)
    slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    bar = tqdm(total=len(requests), desc=desc, disable=not load.progress, unit="req", leave=False)
    t0 = time.perf_counter()

    async def one(index: int, request: BenchRequest) -> RequestRecord:
        try:
            return await send_request(client, target, request, index, t0)
        finally:
            if slots is not None:
                slots.release()
            bar.update(1)

    tasks: list[asyncio.Task[RequestRecord]] = []
    num_not_sent = 0
    for index, (request, offset) in enumerate(zip(requests, offsets, strict=True)):
        delay = offset - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is not None:
            await slots.acquire()  # wait for a free slot here so --duration also stops queued requests
        if load.duration_s is not None and time.perf_counter() - t0 >= load.duration_s:
            if slots is not None:
                slots.release()
            num_not_sent = len(requests) - index
            break
        tasks.append(asyncio.create_task(one(index, request)))
    records = list(await asyncio.gather(*tasks))
    bar.close()
    return LoadResult(load, records, num_not_sent)


async def run_loads(
    target: Target, requests: list[BenchRequest], loads: list[LoadConfig]
) -> list[LoadResult]:
    """Run each load point in turn on the same requests; warmup requests go first and are not recorded."""
    if not requests:
        raise ValueError("the dataset produced no requests; raise --num-prompts or check the dataset file")
    biggest = max(_pool_limits(load, len(requests)).max_connections or 1 for load in loads)
    limits = httpx.Limits(max_connections=biggest, max_keepalive_connections=biggest)
    timeout = httpx.Timeout(target.timeout_s)
    results = []
    # trust_env=False: a proxy from the environment must never sit between the client and the server.
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        first = loads[0]
        if first.warmup:
            warm = [requests[i % len(requests)] for i in range(first.warmup)]
            warm_load = replace(first, request_rate=math.inf, duration_s=None)
            await _run_point(client, target, warm, warm_load, "warmup")
        for i, load in enumerate(loads):
            desc = f"load {i + 1}/{len(loads)}" if len(loads) > 1 else "requests"
            results.append(await _run_point(client, target, requests, load, desc))
    return results
