"""Tool calling on /v1/chat/completions: request validation, the grammar for forced calls, and the answer's
``tool_calls`` in OpenAI's shape (whole message, or streamed deltas that the openai SDK reassembles).

``tool_choice``: ``none`` (tools are not shown to the model), ``auto`` (the model may call; its text is parsed
by the ``--tool-call-parser`` family, needs ``--enable-auto-tool-choice``), ``required`` (a grammar forces a JSON
array of calls, see structured/tools.py) or ``{"type": "function", "function": {"name": ...}}`` (a grammar forces
that function's arguments). Streaming: a named call streams its arguments as they are generated; ``required``
and ``auto`` calls are sent once complete (auto streams plain text up to the parser's start marker).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.errors import BadRequestError
from tokenmill.server.protocol import ChatCompletionRequest
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.tool_parsers import ParsedToolCall, ToolParser, get_tool_parser, parser_for_template
from tokenmill.structured.tools import named_tool_spec, parse_required_output, required_tools_spec


@dataclass
class ToolPlan:
    mode: str  # "auto" | "required" | "named"
    tools: list[dict[str, Any]]  # what the chat template receives
    spec: StructuredOutputsParams | None = None  # the grammar of a forced call
    function_name: str | None = None  # the named function
    parser: ToolParser | None = None  # auto
    parallel: bool = True  # parallel_tool_calls; false keeps the first call only


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def plan_tools(req: ChatCompletionRequest, enable_auto_tool_choice: bool, tool_call_parser: str | None,
               chat_template: str | None) -> ToolPlan | None:
    """None when no tool is offered to the model (no tools, or tool_choice "none")."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise BadRequestError("tool_choice needs a non-empty tools list", param="tool_choice")
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise BadRequestError(f"tool function names must be unique; got {names}", param="tools")
    if choice is None:
        choice = "auto"
    if choice == "none":
        return None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise BadRequestError('tool_choice object must be {"type": "function", "function": {"name": ...}}',
                                  param="tool_choice")
        if name not in names:
            raise BadRequestError(f"tool_choice names function {name!r}, which is not in tools {names}",
                                  param="tool_choice")
        tool = tools[names.index(name)]
        return ToolPlan("named", tools, _spec(lambda: named_tool_spec(tool)), function_name=name)
    if choice == "required":
        parallel = req.parallel_tool_calls is not False
        return ToolPlan("required", tools, _spec(lambda: required_tools_spec(tools, parallel)))
    if choice == "auto":
        parser_name = tool_call_parser or parser_for_template(chat_template)
        if not enable_auto_tool_choice or parser_name is None:
            raise BadRequestError(
                '"auto" tool choice needs the server started with --enable-auto-tool-choice and a '
                "--tool-call-parser (hermes, qwen, llama3_json, mistral) or a chat template whose tool-call "
                "format implies one",
                param="tool_choice",
            )
        return ToolPlan("auto", tools, parser=get_tool_parser(parser_name),
                        parallel=req.parallel_tool_calls is not False)
    raise BadRequestError(f"tool_choice must be 'none', 'auto', 'required' or a function object; got {choice!r}",
                          param="tool_choice")


def _spec(build) -> StructuredOutputsParams:
    try:
        return build()
    except ValueError as exc:
        raise BadRequestError(f"tools: {exc}", param="tools") from exc


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls with their arguments decoded: chat templates render them as objects (``tojson``)."""
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError as exc:
                    raise BadRequestError(f"a tool call's arguments are not valid JSON: {exc}",
                                          param="messages") from exc
    return messages


def parse_calls(plan: ToolPlan, text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """(content, calls) of a finished output."""
    if plan.mode == "named":
        return None, [ParsedToolCall(plan.function_name, text)]
    if plan.mode == "required":
        calls = parse_required_output(text)
        return (None if calls else text), calls
    parsed = plan.parser.parse(text)
    return parsed.content, parsed.tool_calls if plan.parallel else parsed.tool_calls[:1]


def call_dicts(calls: list[ParsedToolCall], ids: list[str] | None = None) -> list[dict[str, Any]]:
    ids = ids or [new_call_id() for _ in calls]
    return [{"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call_id, call in zip(ids, calls, strict=True)]


def tool_message(plan: ToolPlan, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice, and its finish_reason ("tool_calls" when it called)."""
    content, calls = parse_calls(plan, text)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    message = {"role": "assistant", "content": content, "tool_calls": call_dicts(calls)}
    return message, ("tool_calls" if finish_reason == "stop" else finish_reason)


@dataclass
class ToolCallStream:
    """Turns one choice's cumulative text into OpenAI chat deltas while tools are in play."""

    plan: ToolPlan
    sent: int = 0  # characters of text already sent (as content or as named-call arguments)
    held_from: int | None = None  # auto: where the held-back tool-call text starts
    named_id: str | None = None
    called: bool = False
    _ids: list[str] = field(default_factory=list)

    def deltas(self, text: str, finished: bool) -> list[dict[str, Any]]:
        if self.plan.mode == "named":
            return self._named(text)
        if self.plan.mode == "required":
            return self._complete_calls(text) if finished else []
        return self._auto(text, finished)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.called and engine_reason == "stop" else engine_reason

    def _named(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self.named_id is None:
            self.named_id = new_call_id()
            self.called = True
            out.append({"tool_calls": [{"index": 0, "id": self.named_id, "type": "function",
                                        "function": {"name": self.plan.function_name, "arguments": ""}}]})
        if len(text) > self.sent:
            out.append({"tool_calls": [{"index": 0, "function": {"arguments": text[self.sent:]}}]})
            self.sent = len(text)
        return out

    def _complete_calls(self, text: str) -> list[dict[str, Any]]:
        content, calls = parse_calls(self.plan, text)
        out: list[dict[str, Any]] = []
        if not calls:  # not a tool call after all: whatever was held is the answer
            if len(text) > self.sent:
                out.append({"content": text[self.sent:]})
                self.sent = len(text)
            return out
        self.called = True
        for index, call in enumerate(calls):
            out.append({"tool_calls": [{"index": index, "id": new_call_id(), "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        return out

    def _auto(self, text: str, finished: bool) -> list[dict[str, Any]]:
        if finished:
            return self._complete_calls(text)
        marker = self.plan.parser.start_marker
        if self.held_from is None:
            found = text.find(marker, self.sent)
            if found >= 0:
                self.held_from = found
            else:  # hold back a tail that may be the start of the marker
                safe = len(text)
                for k in range(min(len(marker) - 1, len(text) - self.sent), 0, -1):
                    if marker.startswith(text[len(text) - k:]):
                        safe = len(text) - k
                        break
                if safe > self.sent:
                    delta = {"content": text[self.sent:safe]}
                    self.sent = safe
                    return [delta]
                return []
        if self.held_from is not None and self.held_from > self.sent:
            delta = {"content": text[self.sent:self.held_from]}
            self.sent = self.held_from
            return [delta]
        return []
