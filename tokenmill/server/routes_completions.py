"""POST /v1/completions: prompts (text, texts, token ids) → engine requests → a JSON body or an SSE stream.

Choice index = prompt index * n + sample index, as OpenAI numbers them for a list of prompts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.async_llm import RequestStream
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, BadRequestError, error_body, from_engine_error
from tokenmill.server.logprobs import completion_logprobs
from tokenmill.server.params import completion_params
from tokenmill.server.protocol import CompletionRequest, CompletionResponse
from tokenmill.server.request_log import RequestRecord
from tokenmill.server.serving import (
    ServerContext,
    check_model,
    context,
    new_request_id,
    now_seconds,
    start_streams,
    usage,
)
from tokenmill.server.streaming import (
    SSE_DONE,
    ClientDisconnected,
    DisconnectAwareStreamingResponse,
    merge_streams,
    run_unless_disconnected,
    sse_event,
)

router = APIRouter()


def _prompts(ctx: ServerContext, prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (text of token-id prompts is decoded, for echo and logging)."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise BadRequestError("prompt must not be an empty list", param="prompt")
    token_ids: list[list[int]] = []
    texts: list[str] = []
    vocab = ctx.tokenizer.vocab_size
    for item in items:
        if isinstance(item, str):
            token_ids.append(ctx.tokenizer.encode(item))
            texts.append(item)
        else:
            if any(t < 0 or t >= vocab for t in item):
                raise BadRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            token_ids.append(list(item))
            texts.append(ctx.tokenizer.decode(list(item), skip_special_tokens=False))
    return token_ids, texts


class _ChoiceBuilder:
    """Per-choice streaming state: what text and how many tokens were already sent."""

    def __init__(self, ctx: ServerContext, params: SamplingParams, echo_text: str | None) -> None:
        self.ctx = ctx
        self.params = params
        self.echo_text = echo_text
        self.sent_text = 0
        self.sent_tokens = 0
        self.echo_sent = False

    def delta(self, choice: CompletionOutput) -> tuple[str, dict[str, Any] | None]:
        text = choice.text[self.sent_text:]
        logprobs = None
        if self.params.logprobs is not None and choice.logprobs is not None:
            end = len(choice.logprobs)
            logprobs = completion_logprobs(
                self.ctx.tokenizer, choice.token_ids[self.sent_tokens:end], choice.logprobs[self.sent_tokens:end],
                self.params.logprobs, self.sent_text,
            )
            self.sent_tokens = end
        self.sent_text = len(choice.text)
        if self.echo_text is not None and not self.echo_sent:
            self.echo_sent = True
            text = self.echo_text + text
        return text, logprobs


def _choice_json(index: int, text: str, logprobs: dict | None, choice: CompletionOutput) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = context(request)
    request_id = new_request_id("cmpl")
    record = RequestRecord(request_id, "completions", ctx.metrics, ctx.config.log_prompts)
    try:
        check_model(ctx, body.model)
        params = completion_params(body)
        prompts, texts = _prompts(ctx, body.prompt)
        record.prompt_text = texts[0] if len(texts) == 1 else repr(texts)
        streams = await start_streams(ctx, request_id, prompts, params, texts)
    except APIError as exc:
        record.finish(exc.status_code, exc.message)
        raise
    echo = texts if body.echo else [None] * len(texts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(ctx, request_id, params, streams, echo, include_usage, record)
        return DisconnectAwareStreamingResponse(events, media_type="text/event-stream")
    try:
        finals = await run_unless_disconnected(request, _collect(streams, record))
    except ClientDisconnected:
        record.finish(499, "client disconnected")
        return Response(status_code=499)
    except Exception as exc:
        error = from_engine_error(exc)
        record.finish(error.status_code, error.message)
        raise error from exc
    choices = []
    prompt_tokens = completion_tokens = 0
    for prompt_index, output in enumerate(finals):
        prompt_tokens += len(output.prompt_token_ids)
        for choice in output.outputs:
            completion_tokens += len(choice.token_ids)
            text, logprobs = _ChoiceBuilder(ctx, params, echo[prompt_index]).delta(choice)
            choices.append(_choice_json(prompt_index * params.n + choice.index, text, logprobs, choice))
    record.finish(200)
    return JSONResponse({
        "id": request_id,
        "object": "text_completion",
        "created": now_seconds(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })


async def _collect(streams: list[RequestStream], record: RequestRecord) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for index, output in merge_streams(streams):
        record.on_output(output)
        if output.finished:
            finals[index] = output
    return [f for f in finals if f is not None]


async def _stream(
    ctx: ServerContext,
    request_id: str,
    params: SamplingParams,
    streams: list[RequestStream],
    echo: list[str | None],
    include_usage: bool,
    record: RequestRecord,
) -> AsyncIterator[str]:
    created = now_seconds()
    builders: dict[tuple[int, int], _ChoiceBuilder] = {}
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[tuple[int, int], int] = {}
    status, error_text = 499, "client disconnected"
    try:
        async for prompt_index, output in merge_streams(streams):
            record.on_output(output)
            prompt_tokens[prompt_index] = len(output.prompt_token_ids)
            for choice in output.outputs:
                key = (prompt_index, choice.index)
                builder = builders.setdefault(key, _ChoiceBuilder(ctx, params, echo[prompt_index]))
                text, logprobs = builder.delta(choice)
                completion_tokens[key] = len(choice.token_ids)
                if not text and logprobs is None and choice.finish_reason is None:
                    continue
                chunk = {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": ctx.model_name,
                    "choices": [_choice_json(prompt_index * params.n + choice.index, text, logprobs, choice)],
                }
                if include_usage:
                    chunk["usage"] = None
                yield sse_event(chunk)
        if include_usage:
            yield sse_event({
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": ctx.model_name,
                "choices": [],
                "usage": usage(sum(prompt_tokens.values()), sum(completion_tokens.values())),
            })
        yield SSE_DONE
        status, error_text = 200, None
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:  # headers are sent already: report in-band, as OpenAI does
        error = from_engine_error(exc)
        status, error_text = error.status_code, error.message
        yield sse_event(error_body(error.message, error.error_type, error.param, error.code))
        yield SSE_DONE
    finally:
        for stream in streams:
            stream.abort()
        record.finish(status, error_text)
