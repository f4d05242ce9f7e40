"""Model pools: a set of replicas behind one model name. External pools are fixed URLs; managed pools start,
supervise (restart on exit), scale and stop ``tokenmill serve`` replica processes on free loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import httpx

from tokenmill.gateway.balancer import Balancer, make_balancer
from tokenmill.gateway.config import PoolConfig
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.replica import Replica, ReplicaState

log = logging.getLogger("tokenmill.gateway.pools")

READY_POLL_S = 0.25
FIRST_RESTART_BACKOFF_S = 0.5
MAX_RESTART_BACKOFF_S = 10.0
# `tokenmill serve` exits with 2 on a configuration error (bad flag, no such model, no CUDA GPU): a restart
# cannot fix that, so the replica is marked failed at once.
CONFIG_ERROR_EXIT = 2
# `model: embedded` in a managed pool: the SmolLM2 GGUF that ships with tokenmill (runs on a laptop CPU).
EMBEDDED_MODEL = "embedded"
# Pool states in which it serves now (idle: scaled to zero, starts a replica on the first request).
SERVING_STATES = ("ready", "idle")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    # Linux: a replica gets SIGTERM when the gateway dies, even by SIGKILL, so no orphan keeps a port or GPU.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class Pool:
    """Replicas of one model and the balancer that picks among them."""

    def __init__(self, config: PoolConfig, metrics: GatewayMetrics, balancer: Balancer | None = None) -> None:
        self.config = config
        self.name = config.name
        self.metrics = metrics
        self.balancer = balancer or make_balancer(config.balancer)
        self.replicas: list[Replica] = []
        self.last_request_at = time.monotonic()
        self.last_ready_at = 0.0  # when a replica last became ready
        self.queued = 0  # requests waiting at the gateway for a replica of this pool
        self._changed = asyncio.Condition()
        # The event loop keeps only weak references to tasks: hold them until they finish.
        self._background: set[asyncio.Task[None]] = set()

    # --- state -------------------------------------------------------------------------------------------
    def set_state(self, replica: Replica, state: ReplicaState) -> None:
        replica.state = state
        self.refresh_gauges()
        if state is ReplicaState.READY:
            self.last_ready_at = time.monotonic()
            self._spawn_task(self._notify())

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def refresh_gauges(self) -> None:
        for state in ReplicaState:
            count = sum(1 for r in self.replicas if r.state is state)
            self.metrics.replicas.labels(self.name, state.value).set(count)

    @property
    def num_ready(self) -> int:
        return sum(1 for r in self.replicas if r.available)

    def can_grow(self) -> bool:
        """Whether waiting could help: a replica is starting or restarting (managed pools only)."""
        return False

    def serving_state(self) -> tuple[str, str | None]:
        """(state, problem): ``ready``, or why no replica can take a request now, in words for clients."""
        if self.num_ready > 0:
            return "ready", None
        states = ", ".join(f"{r.slot} {r.state.value}" for r in self.replicas) or "no replicas"
        return "unavailable", f"no replica is healthy ({states})"

    @property
    def last_error(self) -> str | None:
        errors = [r.last_error for r in self.replicas if r.last_error]
        return errors[-1] if errors else None

    def health(self) -> dict[str, object]:
        state, problem = self.serving_state()
        return {
            "model": self.name,
            "state": state,
            "serving": state in SERVING_STATES,
            "problem": problem,
            "last_error": self.last_error,
            "ready_replicas": self.num_ready,
            "replicas": len(self.replicas),
            "fallback": self.config.fallback,
        }

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.config.kind,
            "balancer": self.config.balancer,
            "queued": self.queued,
            "state": self.serving_state()[0],
            "last_error": self.last_error,
            "replicas": [r.snapshot() for r in self.replicas],
        }

    def claim(self, replica: Replica) -> None:
        replica.outstanding += 1
        self.last_request_at = time.monotonic()

    def release(self, replica: Replica) -> None:
        replica.outstanding -= 1
        self.last_request_at = time.monotonic()  # idle time counts from the end of the last request

    # --- picking a replica --------------------------------------------------------------------------------
    def choose(self, key: str | None, exclude: Sequence[str] = ()) -> Replica | None:
        fresh = [r for r in self.replicas if r.slot not in exclude]
        # Prefer a replica not tried yet; when every ready one was tried, any ready one beats failing.
        return self.balancer.choose(fresh, key) or self.balancer.choose(self.replicas, key)

    async def acquire(self, key: str | None, exclude: Sequence[str], timeout_s: float) -> Replica | None:
        """A ready replica, waiting up to ``timeout_s`` for one to start (cold start, restart) if none is."""
        self.last_request_at = time.monotonic()
        replica = self.choose(key, exclude)
        if replica is not None:
            return replica
        deadline = time.monotonic() + timeout_s
        self.queued += 1
        self.metrics.queued.labels(self.name).set(self.queued)
        try:
            while replica is None:
                self.on_starved()
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.can_grow():
                    return None
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
                replica = self.choose(key, exclude)
            return replica
        finally:
            self.queued -= 1
            self.metrics.queued.labels(self.name).set(self.queued)

    def on_starved(self) -> None:
        """Called while a request waits for a replica; managed pools start one from zero here."""

    async def start(self) -> None:
        self.refresh_gauges()

    async def stop(self) -> None:
        for replica in self.replicas:
            replica.state = ReplicaState.STOPPED
        self.refresh_gauges()


class ExternalPool(Pool):
    """Fixed URLs of any OpenAI-compatible server; trusted until health checks say otherwise."""

    async def start(self) -> None:
        self.replicas = [
            Replica(slot=url.rstrip("/"), url=url.rstrip("/"), state=ReplicaState.READY)
            for url in self.config.urls
        ]
        await super().start()


class ManagedPool(Pool):
    """Runs ``config.command`` once per replica on a free port; restarts replicas that exit; scales on demand."""

    def __init__(
        self,
        config: PoolConfig,
        metrics: GatewayMetrics,
        client: httpx.AsyncClient,
        log_dir: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(config, metrics)
        self.client = client
        self.host = host
        # A temporary log folder is ours to delete at stop(); a configured log_dir is the operator's.
        self._owns_log_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"tokenmill-gateway-{config.name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.last_scale_at = 0.0

    @property
    def target(self) -> int:
        """Replicas that are meant to be running (not retiring)."""
        return sum(1 for r in self.replicas if not r.stopping)

    async def start(self) -> None:
        await super().start()
        self.scale_to(self.config.replicas, reason="initial")

    def can_grow(self) -> bool:
        # A replica in a crash loop (it exited before ever becoming ready) is not worth waiting for.
        return any(self._starting_cleanly(r) for r in self.replicas)

    @staticmethod
    def _starting_cleanly(replica: Replica) -> bool:
        return replica.state is ReplicaState.STARTING and not replica.stopping and replica.start_failures == 0

    def serving_state(self) -> tuple[str, str | None]:
        if self.num_ready > 0:
            return "ready", None
        live = [r for r in self.replicas if not r.stopping]
        if not live:
            return "idle", None
        error = f"; last error: {self.last_error}" if self.last_error else ""
        if all(r.state is ReplicaState.FAILED for r in live):
            return "failed", f"every replica failed to start and is not restarted{error}"
        if any(self._starting_cleanly(r) for r in live):
            return "starting", "its replicas are still starting"
        if any(r.start_failures > 0 for r in live):
            return "crash_looping", f"its replicas keep exiting before they become ready{error}"
        return super().serving_state()

    def on_starved(self) -> None:
        if self.target == 0:
            self.scale_to(1, reason="cold_start")

    # --- scaling ------------------------------------------------------------------------------------------
    def scale_to(self, count: int, reason: str) -> None:
        """Start or retire replicas until ``count`` are meant to run; logs and counts the decision."""
        current = self.target
        if count == current:
            return
        direction = "up" if count > current else "down"
        log.info(
            "model %s: scaling %s from %d to %d replicas (%s)", self.name, direction, current, count, reason
        )
        self.metrics.scale_events.labels(self.name, direction, reason).inc()
        self.metrics.desired_replicas.labels(self.name).set(count)
        self.last_scale_at = time.monotonic()
        if count > current:
            used = {r.slot for r in self.replicas}
            index = 0
            for _ in range(count - current):
                while f"{self.name}-{index}" in used:
                    index += 1
                replica = Replica(slot=f"{self.name}-{index}", url="")
                used.add(replica.slot)
                self.replicas.append(replica)
                replica.supervisor = asyncio.get_running_loop().create_task(self._supervise(replica))
        else:
            active = [r for r in self.replicas if not r.stopping]
            # Retire replicas that are not serving first, then the least busy.
            active.sort(key=lambda r: (r.available, r.outstanding))
            for replica in active[: current - count]:
                replica.stopping = True
                self._spawn_task(self._retire(replica))
        self.refresh_gauges()

    async def _retire(self, replica: Replica) -> None:
        if replica.available:
            self.set_state(replica, ReplicaState.DRAINING)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while replica.outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await self._terminate(replica)
        if replica.supervisor is not None:
            replica.supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replica.supervisor
        await self._terminate(replica, grace_s=0.0)  # a process spawned while we were draining
        replica.state = ReplicaState.STOPPED
        if replica in self.replicas:
            self.replicas.remove(replica)
        self.refresh_gauges()

    # --- one replica's life -------------------------------------------------------------------------------
    def _command(self, port: int) -> list[str]:
        model = self.config.model or ""
        if model == EMBEDDED_MODEL:
            from tokenmill.model.loader import embedded_model_path

            model = str(embedded_model_path())
        values = {
            "python": sys.executable,
            "model": model,
            "host": self.host,
            "port": str(port),
            "name": self.config.served_name,
        }
        return [part.format(**values) for part in self.config.command] + list(self.config.args)

    async def _spawn(self, replica: Replica) -> None:
        port = free_port(self.host)
        env = {**os.environ, **self.config.env}
        key = self.config.resolved_api_key()
        if key:
            env["TOKENMILL_API_KEY"] = key  # the environment, not argv, so `ps` does not show it
        command = self._command(port)
        log_path = self.log_dir / f"{replica.slot}.log"
        with open(log_path, "ab") as log_file:
            replica.log_offset = log_file.tell()
            replica.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C on the gateway's terminal must not hit replicas directly
                preexec_fn=die_with_parent,
            )
        replica.port = port
        replica.url = f"http://{self.host}:{port}"
        replica.started_at = time.monotonic()
        replica.consecutive_failures = 0
        replica.consecutive_successes = 0
        log.info("model %s: started replica %s pid %d on %s (log %s)",
                 self.name, replica.slot, replica.process.pid, replica.url, log_path)  # fmt: skip

    async def _healthy(self, replica: Replica) -> bool:
        try:
            resp = await self.client.get(f"{replica.url}/health", timeout=2.0)
        except httpx.HTTPError:
            return False  # not listening yet (still loading weights)
        return resp.status_code == 200

    async def _wait_ready(self, replica: Replica) -> bool:
        assert replica.process is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if replica.process.returncode is not None:
                return False
            if await self._healthy(replica):
                return True
            await asyncio.sleep(READY_POLL_S)
        log.error("model %s: replica %s not ready after %.0f s; killing it",
                  self.name, replica.slot, self.config.startup_timeout_s)  # fmt: skip
        await self._terminate(replica, grace_s=0.0)
        return False

    async def _supervise(self, replica: Replica) -> None:
        backoff = FIRST_RESTART_BACKOFF_S
        while not replica.stopping:
            self.set_state(replica, ReplicaState.STARTING)
            await self._spawn(replica)
            assert replica.process is not None
            ready = await self._wait_ready(replica) and not replica.stopping
            if ready:
                log.info("model %s: replica %s ready after %.1f s",
                         self.name, replica.slot, time.monotonic() - replica.started_at)  # fmt: skip
                backoff = FIRST_RESTART_BACKOFF_S
                replica.start_failures = 0
                self.set_state(replica, ReplicaState.READY)
            code = await replica.process.wait()
            if replica.stopping:
                return
            tail = self._log_tail(replica)
            replica.last_error = f"exited with status {code}" + (f": {tail.strip()}" if tail.strip() else "")
            if replica.state in (ReplicaState.READY, ReplicaState.DRAINING):
                self.metrics.ejections.labels(self.name, "process_exit").inc()
            if not ready:
                replica.start_failures += 1
            if replica.start_failures >= self.config.max_start_failures or (not ready and code == CONFIG_ERROR_EXIT):
                log.error(
                    "model %s: replica %s (pid %d) exited with %d before becoming ready (%d time(s) in a row); "
                    "marking it failed, no more restarts. Its output:\n%s",
                    self.name, replica.slot, replica.process.pid, code, replica.start_failures, tail,
                )  # fmt: skip
                self.metrics.failed_replicas.labels(self.name).inc()
                self.set_state(replica, ReplicaState.FAILED)
                return
            log.warning("model %s: replica %s (pid %d) exited with %d; restarting in %.1f s. Its output:\n%s",
                        self.name, replica.slot, replica.process.pid, code, backoff, tail)  # fmt: skip
            replica.restarts += 1
            self.metrics.restarts.labels(self.name).inc()
            self.set_state(replica, ReplicaState.STARTING)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_RESTART_BACKOFF_S)

    def _log_tail(self, replica: Replica, lines: int = 5) -> str:
        """The last lines the current process wrote (not those of earlier runs in the same file)."""
        path = self.log_dir / f"{replica.slot}.log"
        try:
            with open(path, "rb") as f:
                f.seek(max(replica.log_offset, path.stat().st_size - 4096))
                tail = f.read().decode(errors="replace").splitlines()[-lines:]
        except OSError as err:
            return f"  (cannot read {path}: {err.strerror})"
        return "\n".join(f"  {line}" for line in tail)

    async def _terminate(self, replica: Replica, grace_s: float | None = None) -> None:
        process = replica.process
        if process is None or process.returncode is not None:
            return
        grace = self.config.drain_timeout_s if grace_s is None else grace_s
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            await asyncio.wait_for(process.wait(), timeout=max(grace, 0.1) + 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def stop(self) -> None:
        for replica in self.replicas:
            replica.stopping = True
        await asyncio.gather(*(self._retire(r) for r in list(self.replicas)))
        await super().stop()
        if self._owns_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)
