"""What every route needs: the ServerContext (engine front, config, metrics, lifecycle) and request plumbing.

Routes get the context with ``context(request)``; ``start_streams`` submits one engine request per prompt and
turns engine rejections into OpenAI errors.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

from tokenmill.engine.async_llm import AsyncLLM, RequestStream
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import APIError, NotFoundError, from_engine_error
from tokenmill.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from tokenmill.server.lifecycle import Lifecycle


@dataclass
class ServerContext:
    async_llm: AsyncLLM
    config: ServerConfig
    metrics: ServerMetrics
    lifecycle: Lifecycle
    model_name: str
    created: int

    @property
    def tokenizer(self):
        return self.async_llm.tokenizer


def context(request: Request) -> ServerContext:
    return request.app.state.ctx


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_seconds() -> int:
    return int(time.time())


def check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model != ctx.model_name:
        raise NotFoundError(
            f"model {model!r} does not exist on this server; it serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def start_streams(
    ctx: ServerContext,
    request_id: str,
    prompts: list[list[int]],
    params: SamplingParams,
    prompt_texts: list[str | None],
) -> list[RequestStream]:
    """Submit one engine request per prompt; on any rejection abort those already accepted and raise APIError."""
    streams: list[RequestStream] = []
    try:
        for index, (token_ids, text) in enumerate(zip(prompts, prompt_texts, strict=True)):
            engine_id = request_id if len(prompts) == 1 else f"{request_id}-{index}"
            streams.append(await ctx.async_llm.add_request(engine_id, token_ids, params, prompt=text))
    except Exception as exc:
        for stream in streams:
            stream.abort()
        error = from_engine_error(exc)
        if len(prompts) > 1 and not isinstance(exc, APIError):
            error.message = f"prompt {len(streams)}: {error.message}"
        raise error from exc
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    return streams


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
