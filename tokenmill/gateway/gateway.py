"""The gateway's runtime: builds pools, router, health checks, autoscalers and the HTTP client from a config,
and starts/stops them together. ``app.py`` serves HTTP on top of one ``Gateway``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import httpx

from tokenmill.gateway.auth import KeyAuth
from tokenmill.gateway.autoscaler import Autoscaler
from tokenmill.gateway.config import GatewayConfig
from tokenmill.gateway.health import HealthChecker, HealthTracker
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pools import ExternalPool, ManagedPool, Pool
from tokenmill.gateway.proxy import Proxy
from tokenmill.gateway.router import Router

log = logging.getLogger("tokenmill.gateway")


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.router = Router(config)
        self.auth = KeyAuth(config.keys)
        self.health = HealthTracker(config.health, self.metrics)
        self.pools: dict[str, Pool] = {}
        self.autoscalers: list[Autoscaler] = []
        self._client: httpx.AsyncClient | None = None
        self._proxy: Proxy | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the gateway is not started; call start() first")
        return self._client

    @property
    def proxy(self) -> Proxy:
        if self._proxy is None:
            raise RuntimeError("the gateway is not started; call start() first")
        return self._proxy

    async def start(self) -> None:
        cfg = self.config
        timeout = httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s)
        limits = httpx.Limits(
            max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections
        )
        # One pooled client for every backend: keep-alive connections save a TCP handshake per request.
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self._proxy = Proxy(
            self._client, self.health, self.metrics, cfg.max_attempts, cfg.cold_start_timeout_s
        )
        log_root = Path(cfg.log_dir) if cfg.log_dir else None
        for pool_cfg in cfg.models:
            pool: Pool
            if pool_cfg.kind == "managed":
                log_dir = log_root / pool_cfg.name if log_root else None
                pool = ManagedPool(pool_cfg, self.metrics, self._client, log_dir)
                if pool_cfg.autoscale is not None:
                    self.autoscalers.append(Autoscaler(pool, pool_cfg.autoscale, self._client, self.metrics))
            else:
                pool = ExternalPool(pool_cfg, self.metrics)
            self.pools[pool_cfg.name] = pool
            await pool.start()
        checker = HealthChecker(self.health, self._client, lambda: self.pools.values())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(checker.run())]
        self._tasks += [loop.create_task(a.run()) for a in self.autoscalers]
        log.info("gateway fronting %s", ", ".join(self.router.names()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(pool.stop() for pool in self.pools.values()))
        if self._client is not None:
            await self._client.aclose()

    def model_health(self) -> dict[str, dict[str, object]]:
        """Per pool: its state, whether it serves now, and ``can_serve`` (it, or its fallback, serves)."""
        health = {name: pool.health() for name, pool in self.pools.items()}
        for name, entry in health.items():
            fallback = entry["fallback"]
            via_fallback = isinstance(fallback, str) and bool(health[fallback]["serving"])
            entry["can_serve"] = bool(entry["serving"]) or via_fallback
            self.metrics.model_serving.labels(name).set(1 if entry["serving"] else 0)
        return health

    def route_health(self, name: str) -> dict[str, object] | None:
        """Health of one routed name (pool, alias or virtual model), or None if the gateway does not know it."""
        pools = self.router.pools_of(name)
        if pools is None:
            return None
        health = self.model_health()
        entries = [health[p] for p in pools]
        return {"model": name, "can_serve": all(e["can_serve"] for e in entries), "pools": entries}

    def serving(self) -> bool:
        """True when every routed model can serve: its pool (or its fallback's) has a ready replica or can start one."""
        return all(entry["can_serve"] for entry in self.model_health().values())

    def status(self) -> dict[str, object]:
        return {"pools": [p.snapshot() for p in self.pools.values()]}
