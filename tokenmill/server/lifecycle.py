"""Process lifecycle: SIGTERM drain, engine death → exit non-zero, in-flight request accounting.

``TokenmillServer`` (a uvicorn Server) turns the first SIGTERM/SIGINT into a drain instead of an immediate stop;
``LifecycleMiddleware`` answers 503 while draining and counts in-flight requests so the drain knows when to end.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import ServiceUnavailableError
from tokenmill.server.request_cut import CuttableRequest
from tokenmill.server.request_log import REQUEST_FATE, log_rejected

logger = logging.getLogger("tokenmill.server")

# Paths that keep answering while draining: probes must see the 503 from /health, scrapers the last metrics.
_ALWAYS_OPEN = ("/health", "/metrics")
# Exit status when the drain timeout cut requests, so a supervisor knows work was dropped (1: engine died).
EXIT_DRAIN_TIMEOUT = 3
# Seconds cut requests get to abort their engine requests and send their error before the server stops.
_CUT_GRACE = 5.0


class Lifecycle:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.draining = False
        self.engine_dead = False
        self.in_flight = 0
        self.exit_code = 0
        self.exit_reason = ""
        self.requests: set[CuttableRequest] = set()
        self.server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()

    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _stop_server(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    # ---- drain -----------------------------------------------------------------------------------------------
    def request_drain(self) -> None:
        """Safe from a signal handler or another thread."""
        if self._loop is None:
            self._stop_server()
            return
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        logger.info(
            "draining: refusing new requests with 503, waiting up to %.1fs for %d in-flight request(s)",
            self.config.drain_timeout, self.in_flight,
        )
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight > 0:
            await self._cut_in_flight()
        else:
            logger.info("drain complete; stopping")
        self._stop_server()

    async def _cut_in_flight(self) -> None:
        reason = f"drain timeout: the server is shutting down and ended this request after {self.config.drain_timeout:g}s"
        self.exit_code, self.exit_reason = EXIT_DRAIN_TIMEOUT, f"the drain timeout cut {self.in_flight} request(s)"
        logger.warning(
            "drain timeout (%gs) reached with %d request(s) still in flight: ending them with a 503 %r error, "
            "then exiting with status %d", self.config.drain_timeout, self.in_flight, "drain_timeout", self.exit_code,
        )
        for request in list(self.requests):
            request.cut(reason)
        deadline = time.monotonic() + _CUT_GRACE
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # ---- engine death ----------------------------------------------------------------------------------------
    def engine_died(self, exc: BaseException) -> None:
        """Called from the engine thread when its loop crashed."""
        self.exit_code, self.exit_reason = 1, "the engine loop died"
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._on_engine_death, exc)

    def _on_engine_death(self, exc: BaseException) -> None:
        self.engine_dead = True
        logger.error(
            "the engine loop died (%s: %s); /health now answers 503 and the process exits with status 1 in %.1fs",
            type(exc).__name__, exc, self.config.engine_death_grace,
        )
        asyncio.get_running_loop().call_later(self.config.engine_death_grace, self._stop_server)


class LifecycleMiddleware:
    """503 for new requests while draining; counts in-flight HTTP requests (a stream counts until its end)."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining:
            error = ServiceUnavailableError("the server is shutting down and accepts no new requests")
            log_rejected(scope["method"], scope["path"], error.status_code, error.message)
            response = error.to_response()
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        request = CuttableRequest(receive, send)
        fate_token = REQUEST_FATE.set(request.fate)
        self.lifecycle.in_flight += 1
        self.lifecycle.requests.add(request)
        try:
            await self.app(scope, request.receive, request.send)
            await request.finish()
        finally:
            self.lifecycle.requests.discard(request)
            self.lifecycle.in_flight -= 1
            REQUEST_FATE.reset(fate_token)


def bound_url(server: uvicorn.Server) -> str:
    """http://HOST:PORT of a started uvicorn server, with the port the OS gave when the config asked for 0."""
    ports = [sock.getsockname()[1] for listener in getattr(server, "servers", []) for sock in listener.sockets]
    port = ports[0] if ports else server.config.port
    host = server.config.host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class TokenmillServer(uvicorn.Server):
    """uvicorn Server whose first SIGTERM/SIGINT starts a drain; a second one stops at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, startup_message: str) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.startup_message = startup_message
        lifecycle.server = self

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutdown, turning exit 0 into -SIGTERM.
        if self.lifecycle.draining or self.should_exit:
            logger.info("second %s: stopping without waiting", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            return
        logger.info("received %s", signal.Signals(sig).name)
        self.lifecycle.request_drain()

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        logger.info("%s; serving at %s (OpenAI API under /v1)", self.startup_message, bound_url(self))
