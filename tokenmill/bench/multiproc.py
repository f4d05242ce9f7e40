"""Spreads one load point over several client processes, for servers faster than one Python core can read.

Requests are dealt round-robin with their global send offsets; every process starts on the same
perf_counter instant (a system-wide monotonic clock), so the merged records share one time origin.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from tokenmill.bench.client import Target
from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.loadgen import (
    LoadConfig,
    LoadResult,
    ScheduledRequest,
    make_client,
    make_schedule,
    run_schedule,
)
from tokenmill.bench.records import RequestRecord

# Spawned workers import tokenmill and httpx first; they start sending this long after being asked.
START_DELAY_S = 3.0


def split_concurrency(max_concurrency: int | None, processes: int) -> list[int | None]:
    """Per-process caps that add up to the global cap (None = unlimited everywhere)."""
    if max_concurrency is None:
        return [None] * processes
    base, extra = divmod(max_concurrency, processes)
    return [base + (1 if i < extra else 0) for i in range(processes)]


async def _worker_async(
    target: Target, schedule: list[ScheduledRequest], load: LoadConfig, start_at: float
) -> tuple[list[RequestRecord], int]:
    async with make_client(target, load.max_concurrency or len(schedule)) as client:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
        return await run_schedule(client, target, schedule, load, start_at)


def _worker(
    target: Target, schedule: list[ScheduledRequest], load: LoadConfig, start_at: float
) -> tuple[list[RequestRecord], int]:
    return asyncio.run(_worker_async(target, schedule, load, start_at))


def run_point_in_processes(
    target: Target, requests: list[BenchRequest], load: LoadConfig, processes: int
) -> LoadResult:
    """One load point over ``processes`` processes; a global concurrency cap C becomes per-process caps
    summing to C (a slot idle in one process cannot be used by another, so this is close to, not exactly,
    one global cap)."""
    caps = split_concurrency(load.max_concurrency, processes)
    processes = sum(1 for cap in caps if cap != 0)
    schedule = make_schedule(requests, load)
    # Spawn, not fork: the parent may hold threads (tqdm, asyncio) that a fork would copy half-way.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
        start_at = time.perf_counter() + START_DELAY_S
        futures = [
            pool.submit(
                _worker, target, schedule[i::processes], replace(load, max_concurrency=caps[i]), start_at
            )
            for i in range(processes)
        ]
        parts = [future.result() for future in futures]
    # Every process timed from start_at, so the merged records share one origin as in a one-process run.
    records = sorted((r for part, _ in parts for r in part), key=lambda r: r.index)
    return LoadResult(load, records, sum(not_sent for _, not_sent in parts))
