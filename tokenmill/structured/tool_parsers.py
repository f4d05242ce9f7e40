"""Tool-call parsers for ``tool_choice="auto"``: the model's text → (content, tool calls), per model family.

Names follow vLLM's ``--tool-call-parser``: ``hermes`` and ``qwen`` (Hermes-2-Pro / Qwen2.5 / Qwen3:
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks), ``llama3_json`` (Llama 3.1/3.2 JSON style:
an optional ``<|python_tag|>`` then ``{"name": ..., "parameters": {...}}`` objects separated by ``;``) and
``mistral`` (``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}``). Each parser also gives the
marker that starts a tool call, so a stream can release text up to it and hold the rest back.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object as text (OpenAI's shape)


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # text outside the tool calls; None when there is none
    tool_calls: list[ParsedToolCall]


def _call_from(obj: Any, argument_keys: tuple[str, ...]) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = next((obj[key] for key in argument_keys if key in obj), {})
    if isinstance(arguments, str):  # some models emit the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolParser:
    name = ""
    start_marker = ""  # text that opens a tool call in this family's output

    def parse(self, text: str) -> ParsedOutput:
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    start_marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedOutput(text, [])
        calls = []
        for body in self._block.findall(text[start:]):
            try:
                call = _call_from(json.loads(body), ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:  # not a well-formed call: the text is the answer
                return ParsedOutput(text, [])
            calls.append(call)
        content = text[:start].strip()
        return ParsedOutput(content or None, calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    start_marker = "{"
    _python_tag = "<|python_tag|>"

    def parse(self, text: str) -> ParsedOutput:
        body = text.strip()
        if body.startswith(self._python_tag):
            body = body[len(self._python_tag):].strip()
        if not body.startswith("{"):
            return ParsedOutput(text, [])
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return ParsedOutput(text, [])
            call = _call_from(obj, ("parameters", "arguments"))
            if call is None:
                return ParsedOutput(text, [])
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return ParsedOutput(None, calls)


class MistralToolParser(ToolParser):
    name = "mistral"
    start_marker = "[TOOL_CALLS]"

    def parse(self, text: str) -> ParsedOutput:
        start = text.find(self.start_marker)
        if start < 0:
            return ParsedOutput(text, [])
        body = text[start + len(self.start_marker):].strip()
        try:
            obj, _ = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return ParsedOutput(text, [])
        calls = [_call_from(item, ("arguments", "parameters")) for item in (obj if isinstance(obj, list) else [obj])]
        if not calls or any(call is None for call in calls):
            return ParsedOutput(text, [])
        content = text[:start].strip()
        return ParsedOutput(content or None, calls)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,  # Qwen2.5/Qwen3 use the Hermes format
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"tool_call_parser {name!r} is not known; choose one of {sorted(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def parser_for_template(chat_template: str | None) -> str | None:
    """The parser a chat template's own tool-call format implies, or None when it shows none."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3_json"
    return None
