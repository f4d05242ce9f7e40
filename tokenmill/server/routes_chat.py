"""POST /v1/chat/completions: messages → the model's chat template → one engine request → JSON or SSE chunks.

Streaming follows OpenAI: a role chunk per choice, content deltas, a final chunk with finish_reason, then usage.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokenmill.engine.async_llm import RequestStream
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import (
    APIError,
    BadRequestError,
    NotSupportedError,
    error_body,
    from_engine_error,
)
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.params import chat_params
from tokenmill.server.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatMessage
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
    run_unless_disconnected,
    sse_event,
)
from tokenmill.server.tool_calls import ToolCallStream, ToolPlan, plan_tools, template_messages, tool_message

router = APIRouter()


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain {role, content} dicts for the chat template; text parts are joined, other parts are rejected."""
    if not messages:
        raise BadRequestError("messages must contain at least one message", param="messages")
    result = []
    for position, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise NotSupportedError(
                        f"messages[{position}]: content part type {part.type!r} is not supported; only 'text' is",
                        param=f"messages.{position}.content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls is not None:
            entry["tool_calls"] = [dict(call) for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def chat_prompt(ctx: ServerContext, messages: list[ChatMessage], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None, continue_final: bool = False) -> list[int]:
    dicts = template_messages(messages_to_dicts(messages))
    if continue_final and (add_generation_prompt or dicts[-1]["role"] != "assistant"):
        raise BadRequestError(
            "continue_final_message needs add_generation_prompt=false and an assistant message last",
            param="continue_final_message",
        )
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    if continue_final:
        extra["continue_final_message"] = True
    try:
        return ctx.tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt, **extra)
    except (ValueError, jinja2.TemplateError) as exc:
        raise BadRequestError(f"the chat template could not render these messages: {exc}", param="messages") from exc


def _logprobs(ctx: ServerContext, params: SamplingParams, choice: CompletionOutput, start: int) -> dict | None:
    if params.logprobs is None or choice.logprobs is None:
        return None
    end = len(choice.logprobs)
    return chat_logprobs(ctx.tokenizer, choice.token_ids[start:end], choice.logprobs[start:end], params.logprobs)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = context(request)
    request_id = new_request_id("chatcmpl")
    record = RequestRecord(request_id, "chat", ctx.metrics, ctx.config.log_prompts)
    try:
        check_model(ctx, body.model)
        plan = plan_tools(body, ctx.config.enable_auto_tool_choice, ctx.config.tool_call_parser,
                          ctx.tokenizer.chat_template)
        params = chat_params(body, plan.spec if plan is not None else None)
        prompt_ids = chat_prompt(ctx, body.messages, body.add_generation_prompt,
                                 plan.tools if plan is not None else None, body.continue_final_message)
        record.prompt_text = repr(messages_to_dicts(body.messages))
        [stream] = await start_streams(ctx, request_id, [prompt_ids], params, [None])
    except APIError as exc:
        record.finish(exc.status_code, exc.message)
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(ctx, request_id, params, stream, include_usage, record, plan)
        return DisconnectAwareStreamingResponse(events, media_type="text/event-stream")
    try:
        final = await run_unless_disconnected(request, _collect(stream, record))
    except ClientDisconnected:
        record.finish(499, "client disconnected")
        return Response(status_code=499)
    except Exception as exc:
        error = from_engine_error(exc)
        record.finish(error.status_code, error.message)
        raise error from exc
    choices = []
    for choice in final.outputs:
        message, finish_reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
        if plan is not None:
            message, finish_reason = tool_message(plan, choice.text, finish_reason)
        choices.append({
            "index": choice.index,
            "message": message,
            "logprobs": _logprobs(ctx, params, choice, 0),
            "finish_reason": finish_reason,
            "stop_reason": choice.stop_reason,
        })
    completion_tokens = sum(len(choice.token_ids) for choice in final.outputs)
    record.finish(200)
    return JSONResponse({
        "id": request_id,
        "object": "chat.completion",
        "created": now_seconds(),
        "model": ctx.model_name,
        "choices": choices,
        "usage": usage(len(final.prompt_token_ids), completion_tokens),
    })


async def _collect(stream: RequestStream, record: RequestRecord) -> RequestOutput:
    try:
        async for output in stream:
            record.on_output(output)
            if output.finished:
                return output
    finally:
        stream.abort()
    raise RuntimeError("the engine stream ended without a finished output")


async def _stream(
    ctx: ServerContext,
    request_id: str,
    params: SamplingParams,
    stream: RequestStream,
    include_usage: bool,
    record: RequestRecord,
    plan: ToolPlan | None = None,
) -> AsyncIterator[str]:
    created = now_seconds()
    tool_streams = [ToolCallStream(plan) for _ in range(params.n)] if plan is not None else None

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload: dict[str, Any] = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": ctx.model_name,
            "choices": choices,
        }
        if include_usage:
            payload["usage"] = None
        payload.update(extra)
        return sse_event(payload)

    sent_text = [0] * params.n
    sent_tokens = [0] * params.n
    prompt_tokens = completion_tokens = 0
    status, error_text = 499, "client disconnected"
    try:
        for index in range(params.n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for output in stream:
            record.on_output(output)
            prompt_tokens = len(output.prompt_token_ids)
            completion_tokens = sum(len(choice.token_ids) for choice in output.outputs)
            for choice in output.outputs:
                i = choice.index
                text = choice.text[sent_text[i]:]
                logprobs = _logprobs(ctx, params, choice, sent_tokens[i])
                sent_text[i] = len(choice.text)
                sent_tokens[i] = len(choice.logprobs) if choice.logprobs is not None else len(choice.token_ids)
                finish_reason = choice.finish_reason
                if tool_streams is not None:  # tool calls: deltas from the parser state, not raw text
                    tool_stream = tool_streams[i]
                    deltas = tool_stream.deltas(choice.text, finish_reason is not None)
                    finish_reason = tool_stream.finish_reason(finish_reason)
                    for delta in deltas:
                        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                    if finish_reason is not None:
                        yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish_reason,
                                      "stop_reason": choice.stop_reason}])
                    continue
                if not text and logprobs is None and finish_reason is None:
                    continue
                delta = {"content": text} if text else {}
                yield chunk([{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                              "stop_reason": choice.stop_reason}])
        if include_usage:
            yield chunk([], usage=usage(prompt_tokens, completion_tokens))
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
        stream.abort()
        record.finish(status, error_text)
