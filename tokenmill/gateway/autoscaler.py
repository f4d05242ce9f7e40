"""Autoscaler for a managed pool: replicas = ceil(load / target per replica) within [min, max], where load is
(waiting + running) scraped from each replica's /metrics plus requests queued at the gateway.

``decide`` is pure (unit-tested); ``Autoscaler.run`` observes, decides and calls ``ManagedPool.scale_to``,
which logs and counts every change. Cold start from zero happens in the pool, on the first request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tokenmill.gateway.config import AutoscaleConfig
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pools import ManagedPool

log = logging.getLogger("tokenmill.gateway.autoscaler")

LOAD_METRICS = ("tokenmill:num_requests_waiting", "tokenmill:num_requests_running")


def parse_load(metrics_text: str) -> float:
    """Sum of waiting + running over every label set in a replica's Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name in LOAD_METRICS:
            total += sum(sample.value for sample in family.samples)
    return total


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str  # load | idle | hold | cooldown | stabilizing


def recommend(config: AutoscaleConfig, current: int, load: float, idle_s: float) -> tuple[int, str]:
    """The replica count one observation asks for: ceil(load / target) within [min, max], and why."""
    wanted = math.ceil(load / config.target_load_per_replica) if load > 0 else 0
    reason = "load"
    if wanted == 0:
        if idle_s < config.idle_timeout_s:
            wanted = max(current, 1) if current > 0 else 0  # recently busy: keep what runs until idle
        else:
            reason = "idle"
    return min(max(wanted, config.min_replicas), config.max_replicas), reason


def decide(
    config: AutoscaleConfig,
    current: int,
    load: float,
    idle_s: float,
    since_scale_s: float,
    window_max: int = 0,
) -> Decision:
    """The replica count to move to now.

    ``window_max`` is the largest recommendation of the last ``scale_down_cooldown_s``: as in the Kubernetes
    HPA's stabilization window, a scale-down goes no lower than that, so one quiet scrape between busy ones
    does not stop a replica that is still needed.
    """
    desired, reason = recommend(config, current, load, idle_s)
    if desired > current:
        if since_scale_s < config.scale_up_cooldown_s:
            return Decision(current, "cooldown")
        return Decision(desired, reason)
    if desired < current:
        stable = max(desired, min(window_max, current))
        if stable >= current:
            return Decision(current, "stabilizing")
        if since_scale_s < config.scale_down_cooldown_s:
            return Decision(current, "cooldown")
        return Decision(stable, reason)
    return Decision(current, "hold")


class Autoscaler:
    def __init__(
        self,
        pool: ManagedPool,
        config: AutoscaleConfig,
        client: httpx.AsyncClient,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.config = config
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self._recent: deque[tuple[float, int]] = deque()  # (time, recommendation): the stabilization window

    async def _replica_load(self, url: str) -> float:
        try:
            resp = await self.client.get(f"{url}/metrics", timeout=2.0)
            resp.raise_for_status()
            return parse_load(resp.text)
        except (httpx.HTTPError, ValueError) as err:
            log.debug("model %s: could not read %s/metrics: %r", self.pool.name, url, err)
            # Fall back to what the gateway itself has in flight there.
            return float(next((r.outstanding for r in self.pool.replicas if r.url == url), 0))

    async def observe(self) -> float:
        urls = [r.url for r in self.pool.replicas if r.available]
        loads = await asyncio.gather(*(self._replica_load(u) for u in urls))
        load = sum(loads) + self.pool.queued
        self.metrics.pool_load.labels(self.pool.name).set(load)
        return load

    async def tick(self) -> Decision:
        load = await self.observe()
        now = self.clock()
        current = self.pool.target
        # A replica that is starting or just became ready has not had a chance to be used: idle counts from
        # the latest of last request, last scale decision and last replica ready, and not at all while starting.
        idle_s = now - max(self.pool.last_request_at, self.pool.last_scale_at, self.pool.last_ready_at)
        if current > 0 and self.pool.num_ready == 0:
            idle_s = 0.0
        while self._recent and self._recent[0][0] < now - self.config.scale_down_cooldown_s:
            self._recent.popleft()
        window_max = max((count for _, count in self._recent), default=0)
        decision = decide(self.config, current, load, idle_s, now - self.pool.last_scale_at, window_max)
        self._recent.append((now, recommend(self.config, current, load, idle_s)[0]))
        log.debug("model %s: load %.1f on %d replicas → %s", self.pool.name, load, current, decision)
        if decision.desired != current:
            self.pool.scale_to(decision.desired, reason=decision.reason)
        return decision

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.tick()
            except Exception:  # the loop must survive one bad tick; the error is logged with its traceback
                log.exception("model %s: autoscaler tick failed", self.pool.name)
