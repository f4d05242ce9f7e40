"""Structured outputs and tool calling through the real server with the real `openai` SDK (tiny random Llama).

The weights are random, so every assertion is about what the grammar guarantees: parsed objects validate,
choices and regexes match, forced tool calls carry valid arguments, streamed deltas reassemble to the
non-streamed call. ``auto`` tool choice is exercised end to end by forcing the Hermes format with a regex.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

MODEL = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]


class Point(BaseModel):
    x: int = Field(ge=-10, le=10)
    y: int = Field(ge=0, le=99)


class City(BaseModel):  # nested object, enum, bounded array, optional; kept short for a rambling random model
    size: Literal["small", "large"]
    center: Point
    zones: list[Literal["a", "b"]] = Field(max_length=2)
    capital: bool | None


class Reading(BaseModel):
    value: float
    unit: Literal["c", "f"]


SCHEMA_MODELS = [Point, City, Reading]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                       "required": ["city", "days"], "additionalProperties": False},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def client(shared_server):
    with openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.mark.parametrize("model", SCHEMA_MODELS, ids=[m.__name__ for m in SCHEMA_MODELS])
def test_parse_with_pydantic_models(client, model):
    parsed = 0
    for seed in range(3):
        try:
            result = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=model,
                                                   temperature=0.9, seed=seed, max_tokens=200)
        except openai.LengthFinishReasonError:  # random weights may ramble inside a free string
            continue
        message = result.choices[0].message
        assert isinstance(message.parsed, model)
        jsonschema.validate(json.loads(message.content), model.model_json_schema())
        parsed += 1
    assert parsed >= 1


def test_choice_regex_and_guided_aliases_on_completions(client):
    choices = ["red", "green", "blue"]
    result = client.completions.create(model=MODEL, prompt="Color:", max_tokens=10, n=4, temperature=1.0,
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.text in choices and c.finish_reason == "stop" for c in result.choices)
    result = client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, n=3, temperature=1.0,
                                       extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert all(re.fullmatch(r"[A-Z]{2}-[0-9]{3}", c.text) for c in result.choices)
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2, 3]}}, "required": ["k"]}
    # 120 tokens hold the longest answer the grammar allows (whitespace runs are capped at 16): it always closes
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0.7, seed=0,
                                            extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(result.choices[0].message.content), schema)


def test_json_object_streamed_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=60, temperature=0.0,
                  response_format={"type": "json_object"})
    whole = client.chat.completions.create(**kwargs).choices[0]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        stream=True, **kwargs) if chunk.choices)
    assert text == whole.message.content
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def _check_weather_args(arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
    return args


def _assert_streamed_call_equals(client, kwargs: dict, name: str, args: dict) -> None:
    """The openai SDK's stream helper assembles the deltas into the same single call."""
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    [streamed] = final.message.tool_calls
    assert streamed.function.name == name and json.loads(streamed.function.arguments) == args


def test_required_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "Weather in Paris for 2 days?"}]
    result = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                            temperature=0.8, seed=4)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    if call.function.name == "get_weather":
        _check_weather_args(call.function.arguments)
    else:
        jsonschema.validate(json.loads(call.function.arguments), TIME_TOOL["function"]["parameters"])
    # The tool's result goes back; the model answers in text.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="none", max_tokens=8, temperature=0.0)
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)


def test_named_tool_call_streamed_reassembles_to_non_streamed(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL, TIME_TOOL],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80,
                  temperature=0.0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather"
    args = _check_weather_args(call.function.arguments)
    _assert_streamed_call_equals(client, kwargs, "get_weather", args)


# The random model cannot choose to call a tool, so a regex makes it write a Hermes-format call; the auto path
# (template gets the tools, the hermes parser reads the text) is then the real one.
HERMES_REGEX = (r'I will check\. <tool_call>\{"name": "get_weather", "arguments": '
                r'\{"city": "(Paris|Oslo)", "days": [1-7]\}\}</tool_call>')


def test_auto_tool_choice_parses_hermes_calls_streamed_and_not(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL],
                  tool_choice="auto", max_tokens=200, temperature=0.0, extra_body={"guided_regex": HERMES_REGEX})
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    assert whole.message.content == "I will check."
    [call] = whole.message.tool_calls
    args = _check_weather_args(call.function.arguments)
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "I will check. "  # text before the marker is streamed as it comes, the call held back
    _assert_streamed_call_equals(client, kwargs, "get_weather", args)
