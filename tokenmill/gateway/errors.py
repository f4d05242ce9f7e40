"""OpenAI-shaped error bodies and responses: ``{"error": {"message", "type", "param", "code"}}``.

The app and proxy build every non-2xx answer here, including the SSE error event of a cut stream.
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def sse_error_event(message: str, code: str = "upstream_stream_cut") -> bytes:
    """The event a client gets when its stream's backend fails after the first byte (the SDK raises on it)."""
    return f"data: {json.dumps(error_body(502, message, code))}\n\n".encode()
