"""The gateway's HTTP face: one OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) plus
/health, /metrics and /gateway/status, over a ``Gateway`` (routing, pools, proxy).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.gateway.balancer import affinity_key
from tokenmill.gateway.errors import error_response
from tokenmill.gateway.gateway import Gateway
from tokenmill.gateway.proxy import ProxyRequest, UpstreamUnavailableError
from tokenmill.gateway.router import Route, UnknownModelError

ROUTED_MODEL_HEADER = "x-tokenmill-routed-model"
ROUTE_REASON_HEADER = "x-tokenmill-route-reason"
SCORE_HEADER = "x-tokenmill-complexity-score"
FORWARD_HEADERS = ("x-request-id", "x-session-id")


def build_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="tokenmill gateway", lifespan=lifespan)
    app.state.gateway = gateway
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "Not found." if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, f"{message} ({request.method} {request.url.path})")

    @app.get("/livez")
    async def livez() -> JSONResponse:
        # The process answers: for liveness/readiness probes, which must not flap with one backend model.
        return JSONResponse({"status": "alive"})

    @app.get("/health")
    async def health() -> JSONResponse:
        models = gateway.model_health()
        down = [name for name, entry in models.items() if not entry["can_serve"]]
        body = {"status": "unavailable" if down else "ok", "unavailable": down, "models": models}
        return JSONResponse(body, 503 if down else 200)

    @app.get("/health/{model:path}")
    async def model_health(model: str) -> JSONResponse:
        detail = gateway.route_health(model)
        if detail is None:
            return error_response(404, f"The model {model!r} does not exist on this gateway.", "model_not_found")
        pools = {entry["model"]: gateway.pools[str(entry["model"])].snapshot() for entry in detail["pools"]}
        for entry in detail["pools"]:
            entry["replicas"] = pools[str(entry["model"])]["replicas"]
        return JSONResponse(detail, 200 if detail["can_serve"] else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        gateway.model_health()  # refreshes the per-model serving gauge
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/gateway/status")
    async def status() -> JSONResponse:
        return JSONResponse(gateway.status())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        denied = _authorize(gateway, request)
        if denied is not None:
            return denied
        return JSONResponse({"object": "list", "data": gateway.router.model_cards(created)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _proxy(gateway, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _proxy(gateway, request, "/v1/chat/completions")

    return app


def _authorize(gateway: Gateway, request: Request) -> Response | None:
    result = gateway.auth.check(request.headers.get("authorization"))
    if result.status == 200:
        return None
    if result.status == 429:
        gateway.metrics.rate_limited.labels(result.key_name or "").inc()
        return error_response(429, result.message, "rate_limit_exceeded",
                              headers={"retry-after": str(result.retry_after_s)})  # fmt: skip
    return error_response(401, result.message, "invalid_api_key")


async def _read_body(request: Request) -> dict | Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return error_response(400, f"The request body is not valid JSON: {err}.", "invalid_json")
    if not isinstance(body, dict):
        return error_response(400, "The request body must be a JSON object.", "invalid_json")
    if not isinstance(body.get("model"), str) or not body["model"]:
        return error_response(400, "The request needs a 'model' string.", "missing_model", "model")
    return body


async def _proxy(gateway: Gateway, request: Request, path: str) -> Response:
    denied = _authorize(gateway, request)
    if denied is not None:
        return denied
    body = await _read_body(request)
    if isinstance(body, Response):
        return body
    try:
        route = gateway.router.resolve(body)
    except UnknownModelError as err:
        return error_response(404, str(err), "model_not_found", "model")
    headers = {h: request.headers[h] for h in FORWARD_HEADERS if h in request.headers}
    headers.setdefault("x-request-id", uuid.uuid4().hex)
    started = time.perf_counter()
    first_failure: str | None = None
    while True:
        pool = gateway.pools[route.model]
        key = None
        if pool.config.balancer == "affinity":
            key = affinity_key(body, request.headers.get("x-session-id"), pool.config.affinity_prefix_chars)

        def on_done(status: int, route: Route = route) -> None:
            gateway.metrics.requests.labels(route.requested, route.model, str(status)).inc()
            gateway.metrics.latency.labels(route.model).observe(time.perf_counter() - started)

        proxy_request = ProxyRequest(path, body, headers, key, bool(body.get("stream")), on_done)
        try:
            response = await gateway.proxy.forward(pool, proxy_request)
            break
        except UpstreamUnavailableError as err:
            fallback = gateway.router.fallback_of(route.model)
            if fallback is None or route.reason == "fallback":
                on_done(err.status)
                message = str(err) if first_failure is None else f"{first_failure} Its fallback: {err}"
                return error_response(err.status, message, "upstream_unavailable")
            first_failure = str(err)
            gateway.metrics.fallbacks.labels(route.model, fallback).inc()
            route = Route(route.requested, fallback, "fallback", route.score)
    gateway.metrics.routed.labels(route.requested, route.model, route.reason).inc()
    response.headers[ROUTED_MODEL_HEADER] = route.model
    response.headers[ROUTE_REASON_HEADER] = route.reason
    if route.score is not None:
        response.headers[SCORE_HEADER] = f"{route.score:.3f}"
    return response
