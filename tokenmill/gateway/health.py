"""Replica health: passive ejection after N consecutive failures, active /health checks, re-admission.

The proxy reports each attempt's outcome here; ``HealthChecker.run`` polls every replica's /health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import httpx

from tokenmill.gateway.config import HealthConfig
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.replica import Replica, ReplicaState

if TYPE_CHECKING:
    from tokenmill.gateway.pools import Pool

log = logging.getLogger("tokenmill.gateway.health")


class HealthTracker:
    def __init__(self, config: HealthConfig, metrics: GatewayMetrics) -> None:
        self.config = config
        self.metrics = metrics

    def record_success(self, pool: Pool, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def record_failure(self, pool: Pool, replica: Replica, reason: str) -> None:
        replica.consecutive_failures += 1
        replica.consecutive_successes = 0
        if (
            replica.state is ReplicaState.READY
            and replica.consecutive_failures >= self.config.failure_threshold
        ):
            self.eject(pool, replica, reason)

    def eject(self, pool: Pool, replica: Replica, reason: str) -> None:
        log.warning(
            "ejecting replica %s (%s) of model %s after %d consecutive failures, last: %s",
            replica.slot, replica.url, pool.name, replica.consecutive_failures, reason,
        )  # fmt: skip
        replica.ejected_at = time.monotonic()
        pool.set_state(replica, ReplicaState.EJECTED)
        self.metrics.ejections.labels(pool.name, reason).inc()

    def record_check(self, pool: Pool, replica: Replica, healthy: bool, detail: str) -> None:
        """One active check's result: ejects a ready replica that keeps failing, re-admits one that recovered."""
        if not healthy:
            self.record_failure(pool, replica, f"health_check: {detail}")
            return
        replica.consecutive_failures = 0
        if replica.state is ReplicaState.EJECTED:
            replica.consecutive_successes += 1
            if replica.consecutive_successes >= self.config.readmit_successes:
                log.info("re-admitting replica %s (%s) of model %s", replica.slot, replica.url, pool.name)
                replica.ejected_at = None
                pool.set_state(replica, ReplicaState.READY)
                self.metrics.readmissions.labels(pool.name).inc()


class HealthChecker:
    """Polls /health of every ready or ejected replica of every pool each ``interval_s``."""

    def __init__(
        self,
        tracker: HealthTracker,
        client: httpx.AsyncClient,
        pools: Callable[[], Iterable[Pool]],
    ) -> None:
        self.tracker = tracker
        self.client = client
        self.pools = pools

    async def check(self, pool: Pool, replica: Replica) -> None:
        if replica.state not in (ReplicaState.READY, ReplicaState.EJECTED):
            return  # starting replicas are watched by their supervisor; draining ones are on their way out
        try:
            resp = await self.client.get(f"{replica.url}/health", timeout=self.tracker.config.timeout_s)
            healthy, detail = resp.status_code == 200, f"status {resp.status_code}"
        except httpx.HTTPError as err:
            healthy, detail = False, type(err).__name__
        if replica.state in (ReplicaState.READY, ReplicaState.EJECTED):  # it may have changed while we waited
            self.tracker.record_check(pool, replica, healthy, detail)

    async def check_all(self) -> None:
        checks = [self.check(pool, r) for pool in self.pools() for r in list(pool.replicas)]
        await asyncio.gather(*checks)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tracker.config.interval_s)
            await self.check_all()
