"""The app factory: ``build_app(async_llm, server_config)`` wires routes, error handlers, middleware and metrics.

Everything lives on ``app.state.ctx`` (no module globals), so several apps can coexist in one process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import tokenmill
from tokenmill.engine.async_llm import AsyncLLM
from tokenmill.server.auth import APIKeyMiddleware
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import install_error_handlers
from tokenmill.server.lifecycle import Lifecycle, LifecycleMiddleware
from tokenmill.server.limits import BodySizeLimitMiddleware
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.routes_chat import router as chat_router
from tokenmill.server.routes_completions import router as completions_router
from tokenmill.server.routes_info import router as info_router
from tokenmill.server.serving import ServerContext, now_seconds


def build_app(async_llm: AsyncLLM, server_config: ServerConfig) -> FastAPI:
    """An app serving ``async_llm``; its lifespan starts the engine thread and shuts it down."""
    lifecycle = Lifecycle(server_config)
    async_llm.on_dead = lifecycle.engine_died
    metrics = ServerMetrics(async_llm.model_name, lambda: async_llm.snapshot)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifecycle.attach_loop(asyncio.get_running_loop())
        if not async_llm.is_healthy and async_llm.error is None:
            async_llm.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_llm.shutdown)

    app = FastAPI(
        title="tokenmill",
        version=tokenmill.__version__,
        description="OpenAI-compatible API of the tokenmill inference engine.",
        lifespan=lifespan,
    )
    app.state.ctx = ServerContext(
        async_llm=async_llm,
        config=server_config,
        metrics=metrics,
        lifecycle=lifecycle,
        model_name=async_llm.model_name,
        created=now_seconds(),
    )
    install_error_handlers(app)
    app.include_router(completions_router)
    app.include_router(chat_router)
    app.include_router(info_router)
    # add_middleware wraps: the last added runs first. Order seen by a request: lifecycle → auth → body limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=server_config.max_request_bytes)
    if server_config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=server_config.api_key, secure_metrics=server_config.secure_metrics)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    return app
