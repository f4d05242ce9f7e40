"""One backend replica as the gateway sees it: URL, state, outstanding requests, failure streaks.

Pools own replicas; the balancer reads them, health checks and the proxy update them.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field


class ReplicaState(enum.StrEnum):
    STARTING = "starting"  # process launched, /health not yet 200
    READY = "ready"  # takes traffic
    EJECTED = "ejected"  # failed N times in a row; active checks may re-admit it
    DRAINING = "draining"  # being scaled down: no new traffic, in-flight requests finish
    FAILED = "failed"  # kept exiting before it became ready: not restarted again (see last_error)
    STOPPED = "stopped"


@dataclass
class Replica:
    # ``slot`` stays fixed across restarts so consistent-hash affinity survives a crash.
    slot: str
    url: str
    state: ReplicaState = ReplicaState.STARTING
    outstanding: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    ejected_at: float | None = None
    started_at: float = field(default_factory=time.monotonic)
    process: asyncio.subprocess.Process | None = None
    port: int | None = None
    restarts: int = 0
    start_failures: int = 0  # exits in a row before becoming ready (a crash loop); reset once ready
    last_error: str | None = None  # why its last process exited: status and its last log lines
    log_offset: int = 0  # where the current process's output starts in the replica's log file
    stopping: bool = False  # set when the pool retires it; its supervisor then does not restart it
    supervisor: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self.state is ReplicaState.READY

    def snapshot(self) -> dict[str, object]:
        return {
            "slot": self.slot,
            "url": self.url,
            "state": self.state.value,
            "outstanding": self.outstanding,
            "consecutive_failures": self.consecutive_failures,
            "restarts": self.restarts,
            "start_failures": self.start_failures,
            "last_error": self.last_error,
            "pid": self.process.pid if self.process is not None else None,
        }
