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


def make_client(target: Target, pool_size: int) -> httpx.AsyncClient:
    """The one HTTP/1.1 keep-alive client of a process, its pool as large as its allowed concurrency."""
    limits = httpx.Limits(max_connections=max(1, pool_size), max_keepalive_connections=max(1, pool_size))
    # trust_env=False: a proxy from the environment must never sit between the client and the server.
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(target.timeout_s), trust_env=False)


# (request index in the dataset, request, send offset in seconds after the run's start)
ScheduledRequest = tuple[int, BenchRequest, float]


async def run_schedule(
    client: httpx.AsyncClient,
    target: Target,
    schedule: list[ScheduledRequest],
    load: LoadConfig,
    t0: float,
    bar: tqdm | None = None,
) -> tuple[list[RequestRecord], int]:
    """Send each request at its offset after ``t0`` (a perf_counter value), at most max_concurrency at once.

    Returns the records and how many requests the duration limit kept from being sent.
    """
    slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None

    async def one(index: int, request: BenchRequest) -> RequestRecord:
        try:
            return await send_request(client, target, request, index, t0)
        finally:
            if slots is not None:
                slots.release()
            if bar is not None:
                bar.update(1)

    tasks: list[asyncio.Task[RequestRecord]] = []
    num_not_sent = 0
    for position, (index, request, offset) in enumerate(schedule):
        delay = offset - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is not None:
            await slots.acquire()  # wait for a free slot here so --duration also stops queued requests
        if load.duration_s is not None and time.perf_counter() - t0 >= load.duration_s:
            if slots is not None:
                slots.release()
            num_not_sent = len(schedule) - position
            break
        tasks.append(asyncio.create_task(one(index, request)))
    return list(await asyncio.gather(*tasks)), num_not_sent


def make_schedule(requests: list[BenchRequest], load: LoadConfig) -> list[ScheduledRequest]:
    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness, load.seed)
    return [(i, r, float(o)) for i, (r, o) in enumerate(zip(requests, offsets, strict=True))]


async def _run_point(
    client: httpx.AsyncClient, target: Target, requests: list[BenchRequest], load: LoadConfig, desc: str
) -> LoadResult:
    bar = tqdm(total=len(requests), desc=desc, disable=not load.progress, unit="req", leave=False)
    records, num_not_sent = await run_schedule(
        client, target, make_schedule(requests, load), load, time.perf_counter(), bar
    )
    bar.close()
    return LoadResult(load, records, num_not_sent)


async def _warmup(target: Target, requests: list[BenchRequest], load: LoadConfig) -> None:
    warm = [requests[i % len(requests)] for i in range(load.warmup)]
    warm_load = replace(load, request_rate=math.inf, duration_s=None)
    async with make_client(target, load.max_concurrency or len(warm)) as client:
        await _run_point(client, target, warm, warm_load, "warmup")


async def run_loads(
    target: Target, requests: list[BenchRequest], loads: list[LoadConfig], client_processes: int = 1
) -> list[LoadResult]:
    """Run each load point in turn on the same requests; warmup requests go first and are not recorded.

    With ``client_processes`` > 1 each point's requests are spread over that many processes (multiproc.py).
    """
    if not requests:
        raise ValueError("the dataset produced no requests; raise --num-prompts or check the dataset file")
    if client_processes < 1:
        raise ValueError(f"--client-processes ({client_processes}) must be >= 1")
    if loads[0].warmup:
        await _warmup(target, requests, loads[0])
    if client_processes > 1:
        from tokenmill.bench.multiproc import run_point_in_processes

        return [run_point_in_processes(target, requests, load, client_processes) for load in loads]
    biggest = max(_pool_limits(load, len(requests)).max_connections or 1 for load in loads)
    results = []
    async with make_client(target, biggest) as client:
        for i, load in enumerate(loads):
            desc = f"load {i + 1}/{len(loads)}" if len(loads) > 1 else "requests"
            results.append(await _run_point(client, target, requests, load, desc))
    return results
