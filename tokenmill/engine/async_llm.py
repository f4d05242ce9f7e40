"""AsyncLLM: runs the synchronous LLMEngine step loop in its own thread and streams outputs to asyncio callers.

The server (tokenmill/server/) submits requests here; each request gets a RequestStream (its newest cumulative
output) that the engine thread feeds through ``loop.call_soon_threadsafe``. Submissions and aborts are queued and applied at the top of each step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop crashed or was shut down; no request can make progress."""


class EngineQueueFullError(RuntimeError):
    """The waiting queue holds ``max_waiting_requests`` requests already (backpressure, HTTP 429)."""


class InjectedEngineFault(RuntimeError):
    """Raised by the test hook ``fault_after_steps`` to simulate an engine crash."""


@dataclass
class EngineSnapshot:
    """Engine counters copied by the engine thread after every loop turn; read by /metrics without locking."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_steps: int = 0  # steps this loop ran (each step batches every scheduled request)
    spec_decode_num_drafts: int = 0  # speculative decoding (vLLM's counters): verification rows
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_accepted_per_pos: list[int] = field(default_factory=list)


@dataclass
class _Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    arrival_time: float
    stream: RequestStream
    accepted: asyncio.Future = field(repr=False)


class RequestStream:
    """The consumer side of one engine request: an async iterator of cumulative RequestOutputs.

    Outputs are cumulative, so the stream holds only the newest one (plus a waiter), not a queue: a consumer
    that falls behind gets the latest state. A finished output or an error is kept over anything put after it.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, owner: AsyncLLM) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._owner = owner
        self._latest: RequestOutput | BaseException | None = None
        self._waiter: asyncio.Future | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called on the stream's own event loop (the engine-core client's reader)."""
        latest = self._latest
        if latest is not None and (isinstance(latest, BaseException) or latest.finished):
            return  # the stream's end is already known
        self._latest = item
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def put_threadsafe(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.put, item)

    async def get(self) -> RequestOutput:
        """The newest output (cumulative, so older ones queued meanwhile add nothing)."""
        while self._latest is None:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item, self._latest = self._latest, None
        if isinstance(item, BaseException):
            self.finished = True
            self._latest = item  # a later get() raises it again
            raise item
        if item.finished:
            self.finished = True
        return item

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()

    def abort(self) -> None:
        """Abort the engine request unless it already finished (idempotent; safe from any coroutine)."""
        if not self.finished:
            self.finished = True
            self._owner.abort(self.request_id)


class AsyncLLM:
    """Thread-backed async front of an ``LLMEngine`` (validate_prompt/add_request/abort_request/step/get_stats)."""

    def __init__(
        self,
        engine: Any,
        *,
        max_waiting_requests: int | None = None,
        fault_after_steps: int | None = None,
        on_dead: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.fault_after_steps = fault_after_steps
        self.snapshot = EngineSnapshot()
        self.error: BaseException | None = None
        self.on_dead = on_dead  # called from the engine thread when the loop crashes
        self._cond = threading.Condition()
        self._submissions: deque[_Submission] = deque()
        self._aborts: deque[str] = deque()
        self._streams: dict[str, RequestStream] = {}  # owned by the engine thread
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def num_kv_cache_tokens(self) -> int:
        return self.engine.num_kv_cache_tokens

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("AsyncLLM.start() was called twice")
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still pending get EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- submission ------------------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
    ) -> RequestStream:
        """Queue a request and wait until the engine thread accepted it.

        Raises ValueError (invalid for this model: prompt too long, duplicate id ...), EngineQueueFullError
        (backpressure) or EngineDeadError. The returned stream yields cumulative RequestOutputs.
        """
        loop = asyncio.get_running_loop()
        if params.structured_outputs is not None:  # compile (or find cached) here, not on the engine thread
            await asyncio.to_thread(self.engine.grammars.compile, params.structured_outputs)
        stream = RequestStream(request_id, loop, self)
        submission = _Submission(
            request_id, list(prompt_token_ids), params, prompt, time.monotonic(), stream, loop.create_future()
        )
        with self._cond:
            if self.error is not None or self._stopping:
                raise EngineDeadError(self._dead_message())
            self._submissions.append(submission)
            self._cond.notify_all()
        try:
            await asyncio.shield(submission.accepted)
        except asyncio.CancelledError:
            # The caller went away while we waited; make sure the request does not run unobserved.
            stream.abort()
            raise
        return stream

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        prompt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until finished; closing or cancelling the iterator aborts the request."""
        stream = await self.add_request(request_id, prompt_token_ids, params, prompt)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify_all()

    # ---- engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # noqa: BLE001 - any crash must reach every waiting client
            logger.exception("engine loop died")
            self._fail(exc)
            return
        self._fail(EngineDeadError("the engine was shut down"))

    def _loop_forever(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._submissions or self._aborts or self._stopping or self.engine.has_unfinished_requests()
                ):
                    self._cond.wait()
                if self._stopping:
                    return
                submissions = list(self._submissions)
                self._submissions.clear()
                aborts = list(self._aborts)
                self._aborts.clear()
            self._apply_aborts(aborts)
            for submission in submissions:
                self._apply_submission(submission)
            if self.engine.has_unfinished_requests():
                self._step()
            self._refresh_snapshot()

    def _apply_aborts(self, request_ids: list[str]) -> None:
        live = [rid for rid in request_ids if self._streams.pop(rid, None) is not None]
        if live:
            self.engine.abort_request(live)

    def _apply_submission(self, sub: _Submission) -> None:
        def resolve(exc: BaseException | None) -> None:
            if sub.accepted.done():
                return
            if exc is None:
                sub.accepted.set_result(None)
            elif isinstance(exc, asyncio.CancelledError):
                sub.accepted.cancel()
            else:
                sub.accepted.set_exception(exc)

        error: BaseException | None = None
        if sub.stream.finished:  # aborted before the engine saw it
            error = asyncio.CancelledError()
        else:
            try:
                # An invalid request gets its 400 even under load: retrying it would never help.
                self.engine.validate_prompt(sub.prompt_token_ids, sub.params)
                if self.max_waiting_requests is not None and self._num_waiting() >= self.max_waiting_requests:
                    raise EngineQueueFullError(
                        f"the server is at capacity: {self._num_waiting()} requests are waiting "
                        f"(max_waiting_requests={self.max_waiting_requests}); retry later"
                    )
                self.engine.add_request(
                    sub.request_id, sub.prompt_token_ids, sub.params, prompt=sub.prompt, arrival_time=sub.arrival_time,
                    validated=True,
                )
            except (ValueError, EngineQueueFullError) as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - one bad request must not take the loop down
                logger.exception("engine rejected request %s with an unexpected error", sub.request_id)
                error = exc
        if error is None:
            self._streams[sub.request_id] = sub.stream
        if not sub.stream.loop.is_closed():
            sub.stream.loop.call_soon_threadsafe(resolve, error)

    def _num_waiting(self) -> int:
        return int(self.engine.get_stats().num_waiting)

    def _step(self) -> None:
        outputs = self.engine.step()
        self.snapshot.num_steps += 1
        if self.fault_after_steps is not None and self.snapshot.num_steps >= self.fault_after_steps:
            raise InjectedEngineFault(f"test hook: injected engine fault after {self.snapshot.num_steps} steps")
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:  # aborted meanwhile
                continue
            if output.finished:
                del self._streams[output.request_id]
            stream.put_threadsafe(output)

    def _refresh_snapshot(self) -> None:
        stats = self.engine.get_stats()
        snap = EngineSnapshot(num_steps=self.snapshot.num_steps)
        for name in (
            "num_running",
            "num_waiting",
            "kv_cache_usage",
            "prefix_cache_queries",
            "prefix_cache_hits",
            "num_preemptions",
            "prompt_tokens",
            "generation_tokens",
            "spec_decode_num_drafts",
            "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens",
            "spec_decode_accepted_per_pos",
        ):
            setattr(snap, name, getattr(stats, name, 0))
        self.snapshot = snap  # one reference swap: readers never see a half-updated snapshot

    def _dead_message(self) -> str:
        if self.error is None:
            return "the engine is shutting down"
        return f"the engine loop died: {type(self.error).__name__}: {self.error}"

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            pending = list(self._submissions)
            self._submissions.clear()
        # Tell the owner first, so by the time a client sees its error the server already reports unhealthy.
        if self.on_dead is not None and not isinstance(exc, EngineDeadError):
            try:
                self.on_dead(exc)
            except Exception:  # noqa: BLE001 - failing every pending request below matters more
                logger.exception("the on_dead callback failed")
        dead = EngineDeadError(self._dead_message())
        for sub in pending:
            if not sub.stream.loop.is_closed():
                sub.stream.loop.call_soon_threadsafe(_set_exception_if_pending, sub.accepted, dead)
        for stream in self._streams.values():
            stream.put_threadsafe(EngineDeadError(self._dead_message()))
        self._streams.clear()


def _set_exception_if_pending(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
