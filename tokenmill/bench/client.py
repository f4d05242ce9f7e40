"""Sends one streaming OpenAI request over a shared httpx client and times every text chunk.

Parses SSE ``data:`` lines of /v1/completions and /v1/chat/completions; failures become error kinds, never raise.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from tokenmill.bench import records as rk
from tokenmill.bench.datasets import BenchRequest
from tokenmill.bench.records import RequestRecord

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class Target:
    """The server under test and the request options sent to it."""

    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 300.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint {self.endpoint!r} must be one of {', '.join(ENDPOINTS)}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout ({self.timeout_s}) must be > 0 seconds")

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        if base.endswith("/v1"):  # accept both http://host:port and http://host:port/v1
            base = base[: -len("/v1")]
        return base + ENDPOINTS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(target: Target, request: BenchRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": target.model,
        "max_tokens": request.output_len,
        "temperature": target.temperature,
        "stream": True,
        # Ask for token counts in a final chunk, so output tokens are the server's own count.
        "stream_options": {"include_usage": True},
    }
    if target.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    if target.ignore_eos:
        payload["ignore_eos"] = True
        payload["min_tokens"] = request.output_len
    payload.update(target.extra_body)
    return payload


def _chunk_text(chunk: dict[str, Any]) -> str:
    parts = []
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            parts.append(choice["text"])
        delta = choice.get("delta") or {}
        for key in ("content", "reasoning_content", "reasoning"):
            if delta.get(key):
                parts.append(delta[key])
    return "".join(parts)


class _StreamState:
    """Accumulates one response stream: chunk arrival times and the usage block."""

    def __init__(self, record: RequestRecord, t0: float) -> None:
        self.record, self.t0, self.done = record, t0, False
        self.done_time: float | None = None
        self.chunks = 0

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return  # blank separators, comments (":") and event/id fields carry no tokens
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            self.done, self.done_time = True, time.perf_counter() - self.t0
            return
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError(f"SSE data must be a JSON object, got {data[:80]!r}")
        if chunk.get("error"):
            self.record.error = rk.ERROR_STREAM
            self.record.error_detail = json.dumps(chunk["error"])[:300]
            return
        if _chunk_text(chunk):
            self.record.token_times.append(time.perf_counter() - self.t0)
            self.chunks += 1
        usage = chunk.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                self.record.output_tokens = int(usage["completion_tokens"])
                self.record.output_tokens_source = "usage"
            if usage.get("prompt_tokens") is not None:
                self.record.prompt_tokens = int(usage["prompt_tokens"])


def _classify(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return rk.ERROR_TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        return rk.ERROR_CONNECT
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return rk.ERROR_DISCONNECT
    if isinstance(exc, httpx.ProtocolError | json.JSONDecodeError | ValueError):
        return rk.ERROR_PROTOCOL
    return rk.ERROR_CLIENT


async def _stream(
    client: httpx.AsyncClient, target: Target, request: BenchRequest, state: _StreamState
) -> None:
    record = state.record
    async with client.stream(
        "POST", target.url, json=build_payload(target, request), headers=target.headers()
    ) as resp:
        if resp.status_code != 200:
            body = await resp.aread()
            record.error = rk.http_error_kind(resp.status_code)
            record.error_detail = body.decode("utf-8", "replace")[:300]
            return
        # Split lines ourselves: httpx's aiter_lines costs several times more CPU per SSE event.
        pending = b""
        async for data in resp.aiter_bytes():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not state.done:
                    state.feed(line.decode("utf-8").rstrip("\r"))
                if record.error:
                    return
        # Reading on after [DONE] to the body's end keeps the connection reusable (keep-alive).
    if not state.done:
        record.error, record.error_detail = rk.ERROR_PROTOCOL, "stream ended without data: [DONE]"


async def send_request(
    client: httpx.AsyncClient, target: Target, request: BenchRequest, index: int, t0: float
) -> RequestRecord:
    """Send ``request`` and return its record; ``t0`` is the run's perf_counter origin."""
    record = RequestRecord(
        index=index,
        start=time.perf_counter() - t0,
        end=0.0,
        prompt_tokens=request.prompt_len,
        expected_output_tokens=request.output_len,
    )
    state = _StreamState(record, t0)
    try:
        async with asyncio.timeout(target.timeout_s):  # a whole-request limit; httpx's is per read
            await _stream(client, target, request, state)
    # A load generator must count every failure and keep going, so any exception becomes an error kind.
    except Exception as exc:  # noqa: BLE001
        record.error_detail = f"{type(exc).__name__}: {exc}"[:300]
        if (
            not state.done
        ):  # after [DONE] the answer is complete; a failure draining the body is not its error
            record.error = _classify(exc)
    # The request ends at [DONE]; reading the closing bytes of the body after it is not part of its latency.
    record.end = state.done_time if state.done_time is not None and record.ok else time.perf_counter() - t0
    if record.output_tokens_source != "usage":
        record.output_tokens = state.chunks  # no usage block: one chunk ≈ one token
    return record
