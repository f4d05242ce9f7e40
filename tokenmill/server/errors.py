"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Routes raise the ``APIError`` subclasses; ``install_error_handlers`` maps them, FastAPI validation errors,
malformed JSON, unknown routes and the engine's own exceptions (queue full, engine dead) to responses.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_llm import EngineDeadError, EngineQueueFullError
from tokenmill.server.input_checks import INVALID_UTF8_CODE, FieldValueError, describe_undecodable
from tokenmill.server.request_log import log_rejected

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_response(self) -> JSONResponse:
        return error_response(self.status_code, self.message, self.error_type, self.param, self.code)


class BadRequestError(APIError):
    pass


class NotSupportedError(APIError):
    default_code = "not_supported"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    default_code = "not_found"


class PayloadTooLargeError(APIError):
    status_code = 413
    default_code = "request_too_large"


class QueueFullError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "draining"


class InternalServerError(APIError):
    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(
    status: int, message: str, error_type: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, error_type, param, code), status_code=status)


def from_engine_error(exc: BaseException) -> APIError:
    """Translate what AsyncLLM.add_request / a stream can raise into an APIError."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineQueueFullError):
        return QueueFullError(str(exc))
    if isinstance(exc, EngineDeadError):
        return InternalServerError(str(exc), code="engine_dead")
    if isinstance(exc, ValueError):
        return BadRequestError(str(exc))
    return InternalServerError(f"internal error: {type(exc).__name__}: {exc}")


def _describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """(message, param, code) of the first error, counting the rest."""
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None, "invalid_value"
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_tag(part)]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {reason}".rstrip(": "), None, "invalid_json"
    cause = first.get("ctx", {}).get("error")
    code = "invalid_value"
    if isinstance(cause, FieldValueError):
        loc += [cause.sub_param] if cause.sub_param else []
        code = cause.code
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    if isinstance(cause, FieldValueError):
        message = f"{where}{cause}"
    else:
        message = f"{where}{first.get('msg', 'invalid value')}"
        if "input" in first and param:
            message += f" (got {_short_repr(first['input'])})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return message, param, code


def _wrong_content_type(request: Request, exc: RequestValidationError) -> str | None:
    """The message for a body FastAPI did not parse because its Content-Type is not JSON, else None."""
    content_type = request.headers.get("content-type")
    if content_type is not None and "json" in content_type.split(";")[0].lower():
        return None
    if not any(tuple(error.get("loc", ())) == ("body",) for error in exc.errors()):
        return None
    got = f"got {content_type!r}" if content_type is not None else "the request has no Content-Type header"
    return f"Content-Type must be application/json; {got} (curl -d sends application/x-www-form-urlencoded)"


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member it tried (``prompt.list[int]``); the client only needs the field path.
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or "[" in part or "-" in part)


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.to_response()

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        wrong_type = _wrong_content_type(request, exc)
        if wrong_type is not None:
            log_rejected(request.method, request.url.path, 415, wrong_type)
            return error_response(415, wrong_type, "invalid_request_error", None, "unsupported_media_type")
        message, param, code = _describe_validation_error(exc)
        log_rejected(request.method, request.url.path, 400, message)
        return error_response(400, message, "invalid_request_error", param, code)

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = str(exc.status_code)
        if exc.status_code == 404:
            message = f"route {request.method} {request.url.path} not found"
        elif isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body", from decoding
            message, code = describe_undecodable(exc.__cause__), INVALID_UTF8_CODE
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        error_type = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        log_rejected(request.method, request.url.path, exc.status_code, message)
        response = error_response(exc.status_code, message, error_type, None, code)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    async def on_engine_error(request: Request, exc: Exception) -> JSONResponse:
        return from_engine_error(exc).to_response()

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error", None, "internal_error")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(EngineQueueFullError, on_engine_error)
    app.add_exception_handler(EngineDeadError, on_engine_error)
    app.add_exception_handler(Exception, on_unexpected)
