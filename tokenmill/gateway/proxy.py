"""Send one request to a pool's replicas: retry on another replica until the first byte reaches the client,
then relay the body (SSE event by event, never the whole stream). A stream cut mid-way is resumed on another
replica (gateway/resume.py); only when none can continue it does the client get an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi.responses import Response, StreamingResponse

from tokenmill.gateway.errors import error_response, sse_error_event
from tokenmill.gateway.health import HealthTracker
from tokenmill.gateway.metrics import GatewayMetrics
from tokenmill.gateway.pools import Pool
from tokenmill.gateway.replica import Replica, ReplicaState
from tokenmill.gateway.resume import (
    DONE_EVENT,
    StreamProgress,
    fit_to_context,
    is_token_ids,
    tokenize_request,
)

log = logging.getLogger("tokenmill.gateway.proxy")

# Statuses that say "this replica cannot take it now" rather than "the request is wrong".
RETRY_STATUSES = {500, 502, 503, 504}
BUSY_STATUS = 429
PASS_HEADERS = ("content-type", "x-request-id")
# Ask proxies in front of the gateway (nginx and the like) not to buffer event streams.
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
MAX_PENDING_BYTES = 1 << 20
REPLICA_HEADER = "x-tokenmill-replica"
# How long a cut stream waits for another replica of its pool to continue it (the client is mid-stream).
RESUME_WAIT_S = 10.0
RESUME_POLL_S = 0.2
GONE_STATES = (ReplicaState.FAILED, ReplicaState.STOPPED)


class UpstreamUnavailableError(RuntimeError):
    """No replica produced a first byte: none available, or every attempt failed."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ProxyRequest:
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict[str, Any]
    headers: dict[str, str]
    affinity_key: str | None
    stream: bool
    # Called once when the response is complete (or cut) with its HTTP status.
    on_done: Callable[[int], None]


class Proxy:
    def __init__(
        self,
        client: httpx.AsyncClient,
        health: HealthTracker,
        metrics: GatewayMetrics,
        max_attempts: int,
        wait_for_replica_s: float,
    ) -> None:
        self.client = client
        self.health = health
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.wait_for_replica_s = wait_for_replica_s

    def _backend_headers(self, pool: Pool, request: ProxyRequest) -> dict[str, str]:
        headers = {"content-type": "application/json", **request.headers}
        key = pool.config.resolved_api_key()
        if key:
            headers["authorization"] = f"Bearer {key}"
        return headers

    async def forward(self, pool: Pool, request: ProxyRequest) -> Response:
        payload = json.dumps({**request.body, "model": pool.config.served_name}).encode()
        headers = self._backend_headers(pool, request)
        tried: list[str] = []
        last_problem = "no replica is available"
        last_busy: httpx.Response | None = None
        for attempt in range(self.max_attempts):
            replica = await pool.acquire(request.affinity_key, tried, self.wait_for_replica_s)
            if replica is None:
                break
            if attempt > 0:
                self.metrics.retries.labels(pool.name).inc()
            tried.append(replica.slot)
            send = self._send_stream if request.stream else self._send_whole
            result = await send(pool, replica, request, payload, headers)
            if isinstance(result, Response):
                result.headers[REPLICA_HEADER] = (
                    replica.slot
                )  # which replica answered: for operators and tests
                return result
            if isinstance(result, httpx.Response):
                last_busy = result  # 429/5xx: remember it to pass on if no other replica does better
                last_problem = f"replica {replica.slot} answered {result.status_code}"
            else:
                last_problem = f"replica {replica.slot}: {result}"
        if last_busy is not None:
            request.on_done(last_busy.status_code)
            return Response(last_busy.content, last_busy.status_code, headers=_pass_headers(last_busy))
        if not tried:  # no replica to try: say why, with the pool's last error (a crash loop, a failed start)
            _, problem = pool.serving_state()
            raise UpstreamUnavailableError(
                f"Model {pool.name!r} cannot serve the request: {problem or 'no replica became ready in time'}.", 503
            )
        raise UpstreamUnavailableError(
            f"Model {pool.name!r} could not serve the request after {len(tried)} attempt(s): {last_problem}.", 502
        )

    async def _send_whole(
        self, pool: Pool, replica: Replica, request: ProxyRequest, payload: bytes, headers: dict[str, str]
    ) -> Response | httpx.Response | str:
        pool.claim(replica)
        try:
            resp = await self.client.post(f"{replica.url}{request.path}", content=payload, headers=headers)
        except httpx.ReadTimeout as err:
            # A timed-out generation is not retried: it would cost another full timeout. (A connect timeout
            # is a TransportError below and goes to another replica.)
            self.health.record_failure(pool, replica, type(err).__name__)
            request.on_done(504)
            return error_response(
                504, f"Model {pool.name!r} did not answer within the request timeout.", "timeout"
            )
        except httpx.TransportError as err:
            self.health.record_failure(pool, replica, type(err).__name__)
            return type(err).__name__
        finally:
            pool.release(replica)
        if resp.status_code in RETRY_STATUSES or resp.status_code == BUSY_STATUS:
            if resp.status_code != BUSY_STATUS:
                self.health.record_failure(pool, replica, f"status {resp.status_code}")
            return resp
        self.health.record_success(pool, replica)
        request.on_done(resp.status_code)
        return Response(resp.content, resp.status_code, headers=_pass_headers(resp))

    async def _send_stream(
        self, pool: Pool, replica: Replica, request: ProxyRequest, payload: bytes, headers: dict[str, str]
    ) -> Response | httpx.Response | str:
        pool.claim(replica)
        handed_over = False
        try:
            built = self.client.build_request(
                "POST", f"{replica.url}{request.path}", content=payload, headers=headers
            )
            try:
                resp = await self.client.send(built, stream=True)
            except httpx.TransportError as err:
                self.health.record_failure(pool, replica, type(err).__name__)
                return type(err).__name__
            if resp.status_code != 200:
                await resp.aread()
                await resp.aclose()
                if resp.status_code in RETRY_STATUSES or resp.status_code == BUSY_STATUS:
                    if resp.status_code != BUSY_STATUS:
                        self.health.record_failure(pool, replica, f"status {resp.status_code}")
                    return resp
                request.on_done(resp.status_code)
                return Response(resp.content, resp.status_code, headers=_pass_headers(resp))
            chunks = resp.aiter_raw()
            try:
                first = await anext(chunks, b"")
            except httpx.TransportError as err:
                await resp.aclose()
                self.health.record_failure(pool, replica, type(err).__name__)
                return type(err).__name__
            self.health.record_success(pool, replica)
            handed_over = True
            relay = self._relay(pool, replica, request, resp, first, chunks)
            return StreamingResponse(
                relay, status_code=200, headers={**_pass_headers(resp), **STREAM_HEADERS}
            )
        finally:
            if not handed_over:
                pool.release(replica)

    async def _relay(
        self,
        pool: Pool,
        replica: Replica,
        request: ProxyRequest,
        resp: httpx.Response,
        first: bytes,
        chunks: AsyncIterator[bytes],
    ) -> AsyncIterator[bytes]:
        status = 200
        pending = first
        progress = StreamProgress(request.path, request.body)
        cut: list[str] = []  # URLs of the replica processes that cut this stream: a continuation goes elsewhere
        held: Replica | None = replica  # the replica this stream holds a claim on
        problem: str | None = None
        try:
            while True:
                try:
                    # Forward whole SSE events as soon as each is complete, so a cut never leaves half an event.
                    while True:
                        end = complete_events_end(pending)
                        if end > 0:
                            yield progress.relay(pending[:end])
                            pending = pending[end:]
                        chunk = await anext(chunks, None)
                        if chunk is None:
                            break
                        pending += chunk
                    if pending:
                        yield progress.relay(pending)
                        pending = b""
                    if not progress.resumes:
                        break  # the first replica answered whole
                    progress.end_continuation()
                    pool.release(replica)
                    held = None
                    await resp.aclose()
                    if not progress.pending() or progress.resumes >= self._max_resumes(progress):
                        yield progress.closing()
                        break
                    # a continuation ended: the next unfinished choice (n > 1, several prompts) goes on
                except httpx.TransportError as err:
                    self.metrics.stream_errors.labels(pool.name).inc()
                    self.health.record_failure(pool, replica, type(err).__name__)
                    log.warning("model %s: stream from replica %s cut after the first byte: %r",
                                pool.name, replica.slot, err)  # fmt: skip
                    pool.release(replica)
                    held = None
                    await resp.aclose()
                    cut.append(replica.url)
                    problem = type(err).__name__
                    if progress.finished:  # only usage or [DONE] was missing
                        yield progress.closing() if progress.resumes else DONE_EVENT
                        break
                    if not progress.resumable() or progress.resumes >= self._max_resumes(progress):
                        status = 502
                        self.metrics.stream_resumes.labels(pool.name, "failed").inc()
                        yield self._cut_event(pool, problem)
                        break
                resumed = await self._resume(pool, request, progress, cut)
                if resumed is None:
                    status = 502
                    self.metrics.stream_resumes.labels(pool.name, "failed").inc()
                    yield self._cut_event(pool, problem or "cut")
                    break
                replica, resp, chunks = resumed
                held = replica
                pending = b""
                self.metrics.stream_resumes.labels(pool.name, "resumed").inc()
                log.info("model %s: stream resumed on replica %s (choice %s, %d chunk(s) sent before)",
                         pool.name, replica.slot, progress.current,
                         progress.choices[progress.current or 0].chunks)  # fmt: skip
        finally:
            if held is not None:
                pool.release(held)
            await resp.aclose()
            request.on_done(status)

    @staticmethod
    def _max_resumes(progress: StreamProgress) -> int:
        # Every choice may be continued, each a few times (a second replica may die too); never loop forever.
        return progress.num_choices * 3

    @staticmethod
    def _cut_event(pool: Pool, problem: str) -> bytes:
        return sse_error_event(
            f"The backend serving model {pool.name!r} failed mid-stream ({problem}) "
            "and no other replica could continue it; the response is incomplete."
        )

    async def _resume(
        self, pool: Pool, request: ProxyRequest, progress: StreamProgress, cut: list[str]
    ) -> tuple[Replica, httpx.Response, AsyncIterator[bytes]] | None:
        """Ask a replica that did not cut this stream to continue its next unfinished choice; its response
        (status 200, first bytes pending) or None."""
        index = progress.pending()[0]
        headers = self._backend_headers(pool, request)
        for _ in range(self.max_attempts):
            replica = await self._other_replica(pool, request, cut)
            if replica is None:
                return None
            await self._count_prompts(replica, progress, headers)
            text_ids = None
            if progress.needs_token_ids(index):
                counted = await self._tokenize(replica, {"prompt": progress.text_of(index),
                                                         "add_special_tokens": False}, headers)  # fmt: skip
                if counted is None or not isinstance(counted.get("tokens"), list):
                    return None  # no tokenizer to turn the sent text into the prompt's token ids
                text_ids = counted["tokens"]
            body = progress.continuation(index, text_ids)
            if not await self._fit_context(replica, body, headers):
                return None
            payload = json.dumps({**body, "model": pool.config.served_name}).encode()
            pool.claim(replica)
            built = self.client.build_request("POST", f"{replica.url}{request.path}", content=payload, headers=headers)
            try:
                resp = await self.client.send(built, stream=True)
            except httpx.TransportError as err:
                self.health.record_failure(pool, replica, type(err).__name__)
                pool.release(replica)
                cut.append(replica.url)
                continue
            if resp.status_code == 200:
                return replica, resp, resp.aiter_raw()
            await resp.aclose()
            pool.release(replica)
            cut.append(replica.url)
        return None

    async def _other_replica(self, pool: Pool, request: ProxyRequest, cut: list[str]) -> Replica | None:
        """A ready replica process that did not cut this stream, waiting up to RESUME_WAIT_S for one while
        another exists: the only ready one may be the process that just died (its exit not seen yet) while the
        other is briefly ejected or starting (seen on a loaded 2-core box: the resume gave up at once)."""
        deadline = time.monotonic() + min(self.wait_for_replica_s, RESUME_WAIT_S)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            cut_slots = [r.slot for r in pool.replicas if r.url in cut]
            replica = await pool.acquire(request.affinity_key, cut_slots, remaining)
            if replica is None:
                return None
            if replica.url not in cut:
                return replica
            if not any(r.url not in cut and r.state not in GONE_STATES for r in pool.replicas):
                return None  # no other replica process that could come back (ejected) or up (starting)
            await asyncio.sleep(RESUME_POLL_S)

    async def _tokenize(self, replica: Replica, body: dict[str, Any], headers: dict[str, str]) -> dict | None:
        """The replica's ``/tokenize`` answer (tokenmill and vLLM: ``tokens``, ``count``, ``max_model_len``), or
        None when it has none."""
        try:
            resp = await self.client.post(f"{replica.url}/tokenize", json=body, headers=headers)
            counted = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return counted if isinstance(counted, dict) else None

    async def _count_prompts(self, replica: Replica, progress: StreamProgress, headers: dict[str, str]) -> None:
        """Count the original prompts' tokens once, for the usage the resumed stream ends with."""
        if not progress.wants_usage:
            return
        for prompt_index, body in progress.prompt_count_requests().items():
            counted = await self._tokenize(replica, body, headers)
            if counted is not None and isinstance(counted.get("count"), int):
                progress.set_prompt_tokens(prompt_index, counted["count"])

    async def _fit_context(self, replica: Replica, body: dict[str, Any], headers: dict[str, str]) -> bool:
        """Ask the replica how many tokens the continuation's prompt takes and shrink its budget to fit; a
        backend without ``/tokenize``: as is."""
        prompt = body.get("prompt")
        ids = prompt if is_token_ids(prompt) else None
        # a token-id prompt's length is known; its replica still says max_model_len
        request = {"prompt": "", "add_special_tokens": False} if ids is not None else tokenize_request(body)
        counted = await self._tokenize(replica, request, headers) or {}
        if not isinstance(counted.get("count"), int) or not isinstance(counted.get("max_model_len"), int):
            return True
        count = counted["count"] + (len(ids) if ids is not None else 0)
        return fit_to_context(body, count, counted["max_model_len"])


def complete_events_end(buffer: bytes) -> int:
    """Length of the prefix of ``buffer`` made of whole SSE events (0 if none), for either line ending.

    A buffer past ``MAX_PENDING_BYTES`` with no event boundary (not SSE after all) is released whole, so
    the relay never holds more than that.
    """
    ends = [i + len(sep) for sep in (b"\n\n", b"\r\n\r\n") if (i := buffer.rfind(sep)) >= 0]
    if ends:
        return max(ends)
    return len(buffer) if len(buffer) > MAX_PENDING_BYTES else 0


def _pass_headers(resp: httpx.Response) -> dict[str, str]:
    return {k: resp.headers[k] for k in PASS_HEADERS if k in resp.headers}
