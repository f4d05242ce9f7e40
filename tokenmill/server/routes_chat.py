"""POST /v1/chat/completions: messages → the model's chat template → one engine request → JSON or SSE chunks.

The lifecycle is request_flow's (shared with /v1/completions); this file renders chat choices. Streaming follows
OpenAI: a role chunk per choice, content deltas (or tool-call deltas), a chunk with finish_reason, then usage.
"""

from __future__ import annotations

from typing import Any

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenmill.outputs import CompletionOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.errors import BadRequestError, NotSupportedError
from tokenmill.server.logprobs import chat_logprobs
from tokenmill.server.params import chat_params
from tokenmill.server.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatMessage
from tokenmill.server.request_flow import ChoiceFormat, ChoiceProgress, Submission, run_request
from tokenmill.server.request_log import RequestRecord
from tokenmill.server.serving import ServerContext, check_model, context
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


class ChatFormat(ChoiceFormat):
    id_prefix, endpoint = "chatcmpl", "chat"
    response_object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, ctx: ServerContext, params: SamplingParams, plan: ToolPlan | None) -> None:
        self.ctx = ctx
        self.params = params
        self.plan = plan
        self.tool_streams: dict[int, ToolCallStream] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _logprobs(self, choice: CompletionOutput, start: int, end: int) -> dict | None:
        if self.params.logprobs is None or choice.logprobs is None:
            return None
        return chat_logprobs(self.ctx.tokenizer, choice.token_ids[start:end], choice.logprobs[start:end],
                             self.params.logprobs)

    def deltas(self, index: int, prompt_index: int, choice: CompletionOutput,
               progress: ChoiceProgress) -> list[dict[str, Any]]:
        text, start, end = progress.advance(choice, self.params.logprobs is not None)
        logprobs = self._logprobs(choice, start, end)
        finish_reason = choice.finish_reason
        if self.plan is not None:  # tool calls: deltas from the parser state, not raw text
            tool_stream = self.tool_streams.setdefault(index, ToolCallStream(self.plan))
            out = [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                   for delta in tool_stream.deltas(choice.text, finish_reason is not None)]
            finish_reason = tool_stream.finish_reason(finish_reason)
            if finish_reason is not None:
                out.append({"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason,
                            "stop_reason": choice.stop_reason})
            return out
        if not text and logprobs is None and finish_reason is None:
            return []
        return [{"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                 "finish_reason": finish_reason, "stop_reason": choice.stop_reason}]

    def final(self, index: int, prompt_index: int, choice: CompletionOutput) -> dict[str, Any]:
        message, finish_reason = {"role": "assistant", "content": choice.text}, choice.finish_reason
        if self.plan is not None:
            message, finish_reason = tool_message(self.plan, choice.text, finish_reason)
        return {
            "index": index,
            "message": message,
            "logprobs": self._logprobs(choice, 0, len(choice.logprobs or ())),
            "finish_reason": finish_reason,
            "stop_reason": choice.stop_reason,
        }


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = context(request)

    def prepare(record: RequestRecord) -> Submission:
        check_model(ctx, body.model)
        plan = plan_tools(body, ctx.config.enable_auto_tool_choice, ctx.config.tool_call_parser,
                          ctx.tokenizer.chat_template)
        params = chat_params(body, plan.spec if plan is not None else None)
        prompt_ids = chat_prompt(ctx, body.messages, body.add_generation_prompt,
                                 plan.tools if plan is not None else None, body.continue_final_message)
        record.prompt_text = repr(messages_to_dicts(body.messages))
        return Submission([prompt_ids], [None], params, ChatFormat(ctx, params, plan), bool(body.stream),
                          bool(body.stream_options and body.stream_options.include_usage))

    return await run_request(request, ctx, ChatFormat.id_prefix, ChatFormat.endpoint, prepare)
