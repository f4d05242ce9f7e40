"""Ending an in-flight HTTP request from the server side (drain timeout) with an error the client can see.

``CuttableRequest`` wraps one request's ASGI ``receive``/``send``. ``cut(reason)`` makes the route see a disconnect
(so it aborts its engine request and frees its KV blocks), drops whatever the route still sends, and then
``finish`` ends the response itself: a 503 ``drain_timeout`` error if nothing was sent yet, or one SSE error event
(no ``[DONE]``, so SDKs raise instead of returning a truncated text) on a stream already under way.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Send

from tokenmill.server.errors import ServiceUnavailableError, error_body
from tokenmill.server.request_log import RequestFate
from tokenmill.server.streaming import sse_event

DRAIN_TIMEOUT_CODE = "drain_timeout"
_DISCONNECT: Message = {"type": "http.disconnect"}


class CuttableRequest:
    def __init__(self, receive: Receive, send: Send) -> None:
        self.fate = RequestFate()
        self._receive = receive
        self._send = send
        self._cut = asyncio.Event()
        self._started = False
        self._event_stream = False
        self._ended = False

    def cut(self, reason: str) -> None:
        self.fate.cut_reason = reason
        self._cut.set()

    async def receive(self) -> Message:
        if self._cut.is_set():
            return _DISCONNECT
        incoming = asyncio.ensure_future(self._receive())
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            await asyncio.wait({incoming, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not incoming.done():
                incoming.cancel()
        if incoming.done() and not incoming.cancelled():
            return incoming.result()
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        if self._cut.is_set():
            return  # finish() ends this response
        if message["type"] == "http.response.start":
            self._started = True
            headers = dict(message.get("headers", []))
            self._event_stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self._ended = True
        await self._send(message)

    async def finish(self) -> None:
        """After the route returned: end the response of a cut request (no-op for one that completed)."""
        if self.fate.cut_reason is None or self._ended:
            return
        error = ServiceUnavailableError(self.fate.cut_reason, code=DRAIN_TIMEOUT_CODE)
        if not self._started:
            response = error.to_response()
            response.headers["Connection"] = "close"
            await self._send({"type": "http.response.start", "status": response.status_code,
                              "headers": response.raw_headers})
            await self._send({"type": "http.response.body", "body": response.body})
            return
        tail = b""
        if self._event_stream:
            tail = sse_event(error_body(error.message, error.error_type, error.param, error.code)).encode()
        await self._send({"type": "http.response.body", "body": tail, "more_body": False})
