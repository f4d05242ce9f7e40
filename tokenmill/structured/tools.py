"""Forced tool calls: ``tool_choice="required"`` or a named function becomes a JSON-schema grammar, and the
grammar-shaped output becomes tool calls again.

Named function: the output is the function's arguments object (its ``parameters`` schema). Required: a JSON
array of ``{"name": <one of the tools>, "parameters": {...}}`` (one item when parallel_tool_calls is false).
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.tool_parsers import ParsedToolCall

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def function_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or EMPTY_PARAMETERS


# Forced calls are compact JSON: the arguments are machine-read, and blanks would only spend tokens.
def named_tool_spec(tool: dict[str, Any]) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=function_parameters(tool), disable_any_whitespace=True)


def required_tools_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    items = [
        {
            "type": "object",
            "properties": {"name": {"const": tool["function"]["name"]}, "parameters": function_parameters(tool)},
            "required": ["name", "parameters"],
        }
        for tool in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items[0] if len(items) == 1 else {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def required_tools_spec(tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=required_tools_schema(tools, parallel), disable_any_whitespace=True)


def parse_required_output(text: str) -> list[ParsedToolCall]:
    """The calls in a finished ``required`` output (grammar-shaped, so it parses unless cut by max_tokens)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list):
        return []
    return [ParsedToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False))
            for item in items if isinstance(item, dict) and "name" in item and "parameters" in item]
