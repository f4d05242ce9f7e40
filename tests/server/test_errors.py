"""Acceptance 3: bad inputs get their status and an OpenAI error body; a valid request right after succeeds.

Runs against the shared real server subprocess; also the routes' small helpers (/health, /version, /tokenize).
"""

from __future__ import annotations

import pytest

MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 2}

BAD_REQUESTS = [
    # (id, path, body, status, param expected in the error, words expected in the message)
    ("float_top_k", "/v1/completions", {**COMPLETION, "top_k": 2.5}, 400, "top_k", "integer"),
    ("negative_max_tokens", "/v1/completions", {**COMPLETION, "max_tokens": -1}, 400, "max_tokens", ">= 1"),
    ("negative_temperature", "/v1/chat/completions", {**CHAT, "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("n_zero", "/v1/chat/completions", {**CHAT, "n": 0}, 400, "n", ">= 1"),
    ("too_long", "/v1/completions", {**COMPLETION, "max_tokens": 10_000}, 400, None, "max_model_len (256)"),
    ("empty_messages", "/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", "at least one"),
    ("string_temperature", "/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature", "number"),
    ("wrong_type_prompt", "/v1/completions", {**COMPLETION, "prompt": {"a": 1}}, 400, "prompt", ""),
    ("missing_prompt", "/v1/completions", {"model": MODEL}, 400, "prompt", "required"),
    ("bad_role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", ""),
    ("top_p_zero", "/v1/completions", {**COMPLETION, "top_p": 0.0}, 400, "top_p", "(0, 1]"),
    ("tool_choice_unknown", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, 400,
     "tool_choice", "must be"),
    ("tool_choice_with_response_format", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, 400, "tool_choice", "cannot be combined"),
    ("json_schema_without_schema", "/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema", "'schema'"),
    ("response_format_unknown", "/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400,
     "response_format.type", "not supported"),
    ("invalid_regex", "/v1/completions", {**COMPLETION, "structured_outputs": {"regex": "[a-"}}, 400, None,
     "invalid regex"),
    ("invalid_schema", "/v1/chat/completions",
     {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     400, None, "invalid JSON schema"),
    ("unenforceable_schema", "/v1/completions",
     {**COMPLETION, "guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, 400, None,
     "#/uniqueItems"),
    ("invalid_grammar", "/v1/completions", {**COMPLETION, "guided_grammar": "root ::= undefined_rule"}, 400, None,
     "invalid grammar"),
    ("two_constraints", "/v1/completions", {**COMPLETION, "guided_regex": "a+", "guided_choice": ["a"]}, 400,
     "guided_choice", "one output constraint"),
    ("empty_choice", "/v1/completions", {**COMPLETION, "guided_choice": []}, 400, "guided_choice", "non-empty"),
    ("named_tool_unknown", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice", "'g'"),
    ("tool_choice_without_tools", "/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice",
     "tools"),
    ("image_part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages.0.content", "not supported"),
    ("unknown_model", "/v1/chat/completions", {**CHAT, "model": "gpt-17"}, 404, "model", "does not exist"),
    ("unknown_model_completion", "/v1/completions", {**COMPLETION, "model": "gpt-17"}, 404, "model", "gpt-17"),
    ("prompt_token_out_of_vocab", "/v1/completions", {**COMPLETION, "prompt": [1, 10**6]}, 400, "prompt", "[0,"),
    ("empty_prompt", "/v1/completions", {**COMPLETION, "prompt": ""}, 400, None, "empty"),
    ("nan_temperature", "/v1/completions", None, 400, "temperature", ""),
    ("huge_n", "/v1/completions", {**COMPLETION, "n": 10**6}, 400, "n", "<= 128"),
    ("huge_seed", "/v1/completions", {**COMPLETION, "seed": 2**70}, 400, "seed", ""),
    ("logprobs_too_many", "/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ("min_tokens_over_max", "/v1/completions", {**COMPLETION, "min_tokens": 5}, 400, "min_tokens", "<= max_tokens"),
]


def _check_error(response, status: int, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


@pytest.fixture(scope="module")
def http(shared_server):
    with shared_server.client() as client:
        yield client


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_then_valid_request(http, case):
    _, path, body, status, param, words = case
    if body is None:  # NaN is not JSON, but Python's parser would accept the literal
        response = http.post(path, content=b'{"prompt": "x", "temperature": NaN}',
                             headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    _check_error(response, status, param, words)
    ok = http.post("/v1/completions", json=COMPLETION)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"] is not None


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b"", b'"just a string"', b'{"prompt": "x", "max_tokens": 2,}'],
    ids=["malformed", "array", "empty", "string", "trailing_comma"],
)
def test_malformed_json_is_400(http, raw):
    response = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    _check_error(response, 400, None, "")
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_unknown_route_and_method(http):
    _check_error(http.get("/v1/nothing-here"), 404, None, "not found")
    _check_error(http.get("/v1/completions"), 405, None, "not allowed")


def test_oversized_body_is_413(http):
    response = http.post("/v1/completions", json={**COMPLETION, "prompt": "x" * (11 * 1024 * 1024)})
    _check_error(response, 413, None, "larger than")
    assert http.post("/v1/completions", json=COMPLETION).status_code == 200


def test_stream_options_without_stream(http):
    _check_error(http.post("/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}}),
                 400, "stream_options", "stream=true")


def test_health_version_tokenize_roundtrip(http):
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    tokens = http.post("/tokenize", json={"prompt": "Paris is the capital"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 256
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Paris is the capital"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 0
    _check_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens", "")
    _check_error(http.post("/tokenize", json={}), 400, "prompt", "exactly one")
