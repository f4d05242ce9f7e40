"""API-key check as a pure ASGI middleware: ``Authorization: Bearer <key>``, compared in constant time.

/health stays open for probes; /metrics too unless ``secure_metrics``. Everything else needs the key.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenmill.server.errors import AuthenticationError
from tokenmill.server.request_log import log_rejected


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, secure_metrics: bool = False) -> None:
        self.app = app
        self._key = api_key.encode()
        self._open_paths = {"/health"} if secure_metrics else {"/health", "/metrics"}

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # compare_digest runs in time independent of where the strings differ.
        return hmac.compare_digest(token.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = AuthenticationError("missing or invalid API key; send it as 'Authorization: Bearer <key>'")
        log_rejected(scope["method"], scope["path"], error.status_code, error.message)
        response = error.to_response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
