"""One request lifecycle for /v1/chat/completions and /v1/completions.

prepare (the endpoint: validate, params, prompt token ids) → submit one engine request per prompt → either stream
SSE chunks or aggregate the final outputs into one JSON body → usage → the request record's one ``finish``.
Errors: before submitting, an APIError is the response; a disconnect is 499 (the engine requests are aborted,
freeing their KV); an engine error is its OpenAI error (in-band as an SSE error event once headers are sent).

The endpoints differ only in how a choice is rendered: ``ChoiceFormat`` (chat: messages, content deltas, tool
calls, chat logprobs; completions: text, echo, completion logprobs). Choice index = prompt index · n + sample
index, as OpenAI numbers them for a list of prompts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.async_llm import RequestStream
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import APIError, error_body, from_engine_error
from tokenmill.server.request_log import RequestRecord
from tokenmill.server.serving import ServerContext, new_request_id, now_seconds, start_streams, usage
from tokenmill.server.streaming import (
    SSE_DONE,
    ClientDisconnected,
    DisconnectAwareStreamingResponse,
    merge_streams,
    run_unless_disconnected,
    sse_event,
)


@dataclass
class ChoiceProgress:
    """What one choice has sent so far (streaming), or nothing yet (a whole response is one delta from zero)."""

    sent_text: int = 0
    sent_tokens: int = 0
    started: bool = False  # its first piece went out (completions' echo rides on it)

    def advance(self, choice: CompletionOutput, with_logprobs: bool) -> tuple[str, int, int]:
        """The text not sent yet and the [start, end) range of tokens whose logprobs are not sent yet."""
        text = choice.text[self.sent_text:]
        start = self.sent_tokens
        end = len(choice.logprobs) if with_logprobs and choice.logprobs is not None else len(choice.token_ids)
        self.sent_text = len(choice.text)
        self.sent_tokens = end
        return text, start, end


class ChoiceFormat:
    """How one endpoint renders choices; one instance per HTTP request (it may keep per-choice state)."""

    id_prefix: str
    endpoint: str  # the request log's name
    response_object: str
    chunk_object: str

    def opening(self, index: int) -> dict[str, Any] | None:
        """A chunk choice sent for choice ``index`` before any output (chat: the assistant role), or None."""
        return None

    def deltas(self, index: int, prompt_index: int, choice: CompletionOutput,
               progress: ChoiceProgress) -> list[dict[str, Any]]:
        """Chunk choices for what ``choice`` gained since ``progress`` (possibly none)."""
        raise NotImplementedError

    def final(self, index: int, prompt_index: int, choice: CompletionOutput) -> dict[str, Any]:
        """The choice of a whole (non-streamed) response."""
        raise NotImplementedError


@dataclass
class Submission:
    """What an endpoint's preparation hands to the lifecycle."""

    prompts: list[list[int]]
    prompt_texts: list[str | None]
    params: SamplingParams
    format: ChoiceFormat
    stream: bool
    include_usage: bool


@dataclass
class _Usage:
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)  # by choice index

    def add(self, prompt_index: int, output: RequestOutput, n: int) -> None:
        self.prompt_tokens[prompt_index] = len(output.prompt_token_ids)
        for choice in output.outputs:
            self.completion_tokens[prompt_index * n + choice.index] = len(choice.token_ids)

    def body(self) -> dict[str, int]:
        return usage(sum(self.prompt_tokens.values()), sum(self.completion_tokens.values()))


async def run_request(request: Request, ctx: ServerContext, id_prefix: str, endpoint: str,
                      prepare: Callable[[RequestRecord], Submission]) -> Response:
    """The lifecycle: ``prepare`` validates and builds the submission (raising APIError for a bad request)."""
    request_id = new_request_id(id_prefix)
    record = RequestRecord(request_id, endpoint, ctx.metrics, ctx.config.log_prompts)
    try:
        sub = prepare(record)
        streams = await start_streams(ctx, request_id, sub.prompts, sub.params, sub.prompt_texts)
    except APIError as exc:
        record.finish(exc.status_code, exc.message)
        raise
    if sub.stream:
        events = _stream(ctx, request_id, sub, streams, record)
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
    n = sub.params.n
    choices = []
    counts = _Usage()
    for prompt_index, output in enumerate(finals):
        counts.add(prompt_index, output, n)
        choices += [sub.format.final(prompt_index * n + choice.index, prompt_index, choice)
                    for choice in output.outputs]
    record.finish(200)
    return JSONResponse({
        "id": request_id,
        "object": sub.format.response_object,
        "created": now_seconds(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": counts.body(),
    })


async def _collect(streams: list[RequestStream], record: RequestRecord) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    try:
        async for index, output in merge_streams(streams):
            record.on_output(output)
            if output.finished:
                finals[index] = output
    finally:  # cancelled (the client left) or failed: nothing may keep running for nobody
        for stream in streams:
            stream.abort()
    if any(final is None for final in finals):
        raise RuntimeError("the engine stream ended without a finished output")
    return finals  # type: ignore[return-value]


async def _stream(ctx: ServerContext, request_id: str, sub: Submission, streams: list[RequestStream],
                  record: RequestRecord) -> AsyncIterator[str]:
    created = now_seconds()
    fmt, n = sub.format, sub.params.n

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload: dict[str, Any] = {"id": request_id, "object": fmt.chunk_object, "created": created,
                                   "model": ctx.model_name, "choices": choices}
        if sub.include_usage:
            payload["usage"] = None
        payload.update(extra)
        return sse_event(payload)

    progress: dict[int, ChoiceProgress] = {}
    counts = _Usage()
    status, error_text = 499, "client disconnected"
    try:
        for index in range(len(streams) * n):
            opening = fmt.opening(index)
            if opening is not None:
                yield chunk([opening])
        async for prompt_index, output in merge_streams(streams):
            record.on_output(output)
            counts.add(prompt_index, output, n)
            for choice in output.outputs:
                index = prompt_index * n + choice.index
                state = progress.get(index)
                if state is None:
                    state = progress[index] = ChoiceProgress()
                for delta in fmt.deltas(index, prompt_index, choice, state):
                    yield chunk([delta])
        if sub.include_usage:
            yield chunk([], usage=counts.body())
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
