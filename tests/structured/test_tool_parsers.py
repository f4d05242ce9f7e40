"""Tool-call parsers on each family's published output format, and the streamed deltas they drive."""

from __future__ import annotations

import json

import pytest

from tokenmill.server.tool_calls import ToolCallStream, ToolPlan
from tokenmill.structured.tool_parsers import get_tool_parser, parser_for_template
from tokenmill.structured.tools import parse_required_output, required_tools_schema


def test_hermes_and_qwen_blocks():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    for name in ("hermes", "qwen"):
        parsed = get_tool_parser(name).parse(text)
        assert parsed.content == "Let me check."
        assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [
            ("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]


def test_hermes_plain_text_and_broken_call_stay_text():
    parser = get_tool_parser("hermes")
    assert parser.parse("Just an answer.").tool_calls == []
    broken = "<tool_call>{not json</tool_call>"
    assert parser.parse(broken).content == broken and parser.parse(broken).tool_calls == []


def test_llama3_json_single_and_semicolon_separated():
    parser = get_tool_parser("llama3_json")
    one = parser.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert [(c.name, json.loads(c.arguments)) for c in one.tool_calls] == [("get_weather", {"city": "Oslo"})]
    assert one.content is None
    two = parser.parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert [c.name for c in two.tool_calls] == ["a", "b"]
    assert parser.parse("The answer is {not a call}").tool_calls == []


def test_mistral_array():
    parser = get_tool_parser("mistral")
    parsed = parser.parse('[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]')
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("add", {"a": 1, "b": 2})]


def test_parser_from_template_and_unknown_name():
    assert parser_for_template("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert parser_for_template("{{ '<|python_tag|>' }}") == "llama3_json"
    assert parser_for_template("plain chatml") is None
    with pytest.raises(ValueError, match="not known"):
        get_tool_parser("gpt5")


def test_required_schema_and_output():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "g"}}]
    schema = required_tools_schema(tools, parallel=False)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    calls = parse_required_output('[{"name": "g", "parameters": {"k": [1]}}]')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("g", {"k": [1]})]
    assert parse_required_output('[{"name": "g", "para') == []  # cut by max_tokens: no call


def _assemble(deltas: list[dict]) -> tuple[str, list[dict]]:
    """What the openai SDK does with deltas: concatenate content, merge tool calls by index."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            slot = calls.setdefault(call["index"], {"id": None, "name": "", "arguments": ""})
            slot["id"] = call.get("id") or slot["id"]
            function = call.get("function", {})
            slot["name"] += function.get("name") or ""
            slot["arguments"] += function.get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)]


def _stream(plan: ToolPlan, text: str, step: int) -> tuple[list[dict], ToolCallStream]:
    stream, deltas = ToolCallStream(plan), []
    for end in range(step, len(text) + step, step):
        deltas += stream.deltas(text[:end], finished=end >= len(text))
    return deltas, stream


@pytest.mark.parametrize("step", [1, 3, 7])
def test_auto_stream_releases_text_and_holds_the_call(step):
    plan = ToolPlan("auto", [], parser=get_tool_parser("hermes"))
    text = 'Sure <tool_c-less text, then <tool_call>{"name": "f", "arguments": {"q": "x"}}</tool_call>'
    deltas, stream = _stream(plan, text, step)
    content, calls = _assemble(deltas)
    assert content == "Sure <tool_c-less text, then "
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("f", {"q": "x"})]
    assert all(c["id"].startswith("call_") for c in calls)
    assert stream.finish_reason("stop") == "tool_calls"
    assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)


def test_auto_without_parallel_calls_keeps_the_first():
    from tokenmill.server.tool_calls import tool_message

    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    both = ToolPlan("auto", [], parser=get_tool_parser("hermes"))
    one = ToolPlan("auto", [], parser=get_tool_parser("hermes"), parallel=False)
    assert [c["function"]["name"] for c in tool_message(both, text, "stop")[0]["tool_calls"]] == ["a", "b"]
    message, finish = tool_message(one, text, "stop")
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["a"] and finish == "tool_calls"


@pytest.mark.parametrize("step", [1, 4])
def test_auto_stream_without_call_is_plain_text(step):
    plan = ToolPlan("auto", [], parser=get_tool_parser("hermes"))
    text = "No tools needed <tool"
    deltas, stream = _stream(plan, text, step)
    assert _assemble(deltas) == (text, []) and stream.finish_reason("stop") == "stop"


def test_named_stream_sends_arguments_as_they_come():
    plan = ToolPlan("named", [], function_name="lookup")
    text = '{"query": "tokenmill"}'
    deltas, stream = _stream(plan, text, 2)
    content, calls = _assemble(deltas)
    assert content == "" and calls[0]["name"] == "lookup" and json.loads(calls[0]["arguments"]) == {"query": "tokenmill"}
    assert len(deltas) > 3 and stream.finish_reason("stop") == "tool_calls"


def test_auto_needs_the_server_flag_and_a_parser():
    from tokenmill.server.errors import BadRequestError
    from tokenmill.server.protocol import ChatCompletionRequest
    from tokenmill.server.tool_calls import plan_tools

    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                "tools": [{"type": "function", "function": {"name": "f"}}]})
    with pytest.raises(BadRequestError, match="--enable-auto-tool-choice"):
        plan_tools(req, False, "hermes", None)
    with pytest.raises(BadRequestError, match="--tool-call-parser"):
        plan_tools(req, True, None, "plain template")
    assert plan_tools(req, True, None, "{{ '<tool_call>' }}").parser.name == "hermes"
    assert plan_tools(req.model_copy(update={"tool_choice": "none"}), True, "hermes", None) is None


def test_chat_template_receives_tools_and_tool_turns(tmp_path):
    """The route hands the template the tools and the assistant/tool turns, with arguments decoded."""
    from types import SimpleNamespace

    from tiny_models import build_tokenizer
    from transformers import AutoTokenizer

    from tokenmill.model.tokenizer import Tokenizer
    from tokenmill.server.protocol import ChatMessage
    from tokenmill.server.routes_chat import chat_prompt

    build_tokenizer(tmp_path)
    template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}<{{ m.role }}>{% for c in m.tool_calls or [] %}"
                "{{ c.function.name }}({{ c.function.arguments.city }}){% endfor %}"
                "{{ m.tool_call_id or '' }}:{{ m.content }}{% endfor %}")
    tokenizer = Tokenizer(AutoTokenizer.from_pretrained(str(tmp_path)), chat_template=template)
    messages = [ChatMessage(role="user", content="Weather?"),
                ChatMessage(role="assistant", tool_calls=[{"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]),
                ChatMessage(role="tool", tool_call_id="call_1", content="cold")]
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    ids = chat_prompt(SimpleNamespace(tokenizer=tokenizer), messages, False, tools)
    assert tokenizer.decode(ids) == "[tool get_weather]<user>:Weather?<assistant>get_weather(Oslo):<tool>call_1:cold"
