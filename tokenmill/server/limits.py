"""Request-body size limit as a pure ASGI middleware: 413 when Content-Length or the streamed body is too big.

Oversized bodies are refused before JSON parsing, so a huge upload cannot exhaust memory.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.errors import PayloadTooLargeError
from tokenmill.server.request_log import log_rejected


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(f"the request body is larger than the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                error = self._too_large()
                log_rejected(scope["method"], scope["path"], error.status_code, error.message)
                await error.to_response()(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises HTTPException from body reading (anything else becomes a 400).
                    raise HTTPException(413, detail=self._too_large().message)
            return message

        await self.app(scope, limited_receive, send)
