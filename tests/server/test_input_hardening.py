"""Issue 25 (server): Unicode's odd corners, undecodable bodies, a wrong Content-Type, tool messages without
content and top_logprobs errors each get a 4xx in the OpenAI error shape with a named code, and the next request
on the same keep-alive connection works. Runs against the shared real server subprocess.
"""

from __future__ import annotations

import json

import httpx
import pytest

MODEL = "tiny-llama"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
JSON_HEADERS = {"content-type": "application/json"}


def _raw(body: dict) -> bytes:
    # ensure_ascii=True spells every non-ASCII character, lone surrogates included, as a \\uXXXX escape.
    return json.dumps(body, ensure_ascii=True).encode()


SURROGATE_CASES = [
    # (id, path, body, expected param)
    ("completion_prompt", "/v1/completions", {**COMPLETION, "prompt": "a\udcff b"}, "prompt"),
    ("high_surrogate_alone", "/v1/completions", {**COMPLETION, "prompt": "\ud800"}, "prompt"),
    ("reversed_pair", "/v1/completions", {**COMPLETION, "prompt": "\udc00\ud800"}, "prompt"),
    ("prompt_list", "/v1/completions", {**COMPLETION, "prompt": ["ok", "x\udfff"]}, "prompt.1"),
    ("streamed_prompt", "/v1/completions", {**COMPLETION, "prompt": "\udcff", "stream": True}, "prompt"),
    ("chat_content", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x\udcff"}]}, "messages.0.content"),
    ("chat_text_part", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]},
     "messages.0.content.0.text"),
    ("chat_name", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": "x", "name": "\udcff"}]}, "messages.0.name"),
    ("streamed_chat", "/v1/chat/completions",
     {**CHAT, "stream": True, "messages": [{"role": "user", "content": "\udcff"}]}, "messages.0.content"),
    ("stop", "/v1/completions", {**COMPLETION, "stop": ["\udcff"]}, "stop.0"),
    ("model", "/v1/chat/completions", {**CHAT, "model": "\udcff"}, "model"),
    ("unknown_field_key", "/v1/completions", {**COMPLETION, "\udcff": 1}, None),
    ("chat_template", "/v1/chat/completions", {**CHAT, "chat_template": "{{ '\udcff' }}"}, "chat_template"),
    ("tokenize", "/tokenize", {"prompt": "a\udcff"}, "prompt"),
]


@pytest.fixture(scope="module")
def http(shared_server):
    with shared_server.client() as client:
        yield client


def _check_error(response: httpx.Response, status: int, code: str, param: str | None, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert error["param"] == param
    assert words in error["message"]


def _next_request_works(http: httpx.Client) -> None:
    ok = http.post("/v1/chat/completions", json=CHAT)
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("case", SURROGATE_CASES, ids=[c[0] for c in SURROGATE_CASES])
def test_lone_surrogate_is_400_and_connection_survives(http, case):
    _, path, body, param = case
    response = http.post(path, content=_raw(body), headers=JSON_HEADERS)
    _check_error(response, 400, "invalid_unicode", param, "lone UTF-16 surrogate")
    _next_request_works(http)  # same client, same keep-alive connection


@pytest.mark.parametrize(
    "text",
    ["\x00", "\ufeffBOM", "\ufffe\uffff", "\U0010ffff", "\u202eevil\u202c", "e\u0301" * 50, "\U0001f468\u200d" * 20,
     "\ud83d\ude80"],  # the last one is a valid surrogate pair in JSON: a rocket
    ids=["nul", "bom", "noncharacters", "max_code_point", "bidi", "combining", "zwj", "surrogate_pair"],
)
def test_valid_unicode_corners_are_served(http, text):
    completion = http.post("/v1/completions", content=_raw({**COMPLETION, "prompt": text}), headers=JSON_HEADERS)
    assert completion.status_code == 200, completion.text
    chat_body = {**CHAT, "messages": [{"role": "user", "content": text}]}
    chat = http.post("/v1/chat/completions", content=_raw(chat_body), headers=JSON_HEADERS)
    assert chat.status_code == 200, chat.text


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "a\xff\xfe", "max_tokens": 2}', b'{"prompt": "\xc3"}', b'\xc0\xaf'],
    ids=["invalid_bytes", "truncated_sequence", "overlong_encoding"],
)
def test_invalid_utf8_has_a_named_code(http, raw):
    response = http.post("/v1/completions", content=raw, headers=JSON_HEADERS)
    _check_error(response, 400, "invalid_utf8", None, "not valid UTF-8")
    _next_request_works(http)


def test_utf8_encoded_surrogate_is_a_lone_surrogate(http):
    # Python's JSON reader decodes bytes with "surrogatepass", so CESU-style bytes arrive as a lone surrogate.
    response = http.post("/v1/completions", content=b'{"prompt": "\xed\xa0\x80"}', headers=JSON_HEADERS)
    _check_error(response, 400, "invalid_unicode", "prompt", "U+D800")
    _next_request_works(http)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_content_type_names_the_content_type(http, content_type):
    response = http.post("/v1/completions", content=json.dumps(COMPLETION), headers={"content-type": content_type})
    _check_error(response, 415, "unsupported_media_type", None, content_type)
    assert "application/json" in response.json()["error"]["message"]
    _next_request_works(http)


def test_missing_content_type_says_so(http):
    response = http.post("/v1/completions", content=json.dumps(COMPLETION))
    _check_error(response, 415, "unsupported_media_type", None, "no Content-Type header")
    _next_request_works(http)


@pytest.mark.parametrize("content", [None, []], ids=["missing", "empty_parts"])
def test_tool_message_without_content_is_rejected(http, content):
    message = {"role": "tool", "tool_call_id": "call_1"}
    if content is not None:
        message["content"] = content
    body = {**CHAT, "messages": [{"role": "user", "content": "hi"}, message]}
    _check_error(http.post("/v1/chat/completions", json=body), 400, "invalid_value", "messages.1.content", "tool")
    _next_request_works(http)


def test_tool_message_with_content_is_served(http):
    body = {**CHAT, "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}
    assert http.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("value", [21, -1])
def test_top_logprobs_errors_name_top_logprobs(http, value):
    body = {**CHAT, "logprobs": True, "top_logprobs": value}
    _check_error(http.post("/v1/chat/completions", json=body), 400, "invalid_value", "top_logprobs", "top_logprobs")


def test_logprob_bytes_are_the_tokens_real_bytes(tiny_llama_dir):
    from tokenmill.model.tokenizer import Tokenizer
    from tokenmill.server.logprobs import token_bytes

    tokenizer = Tokenizer.from_pretrained(tiny_llama_dir)
    text = "東京 🚀 Ελληνικά"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in ids]
    assert any("\ufffd" in piece for piece in pieces), "the text must contain tokens that split a character"
    joined = b"".join(bytes(token_bytes(tokenizer, i, piece)) for i, piece in zip(ids, pieces, strict=True))
    assert joined == text.encode()


def test_chat_logprob_bytes_concatenate_to_the_text(http):
    body = {**CHAT, "messages": [{"role": "user", "content": "東京 🚀 Ελληνικά"}], "max_tokens": 40,
            "logprobs": True, "top_logprobs": 5, "seed": 3, "temperature": 1.0}
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    entries = choice["logprobs"]["content"]
    joined = b"".join(bytes(entry["bytes"]) for entry in entries)
    assert joined.decode(errors="replace") == choice["message"]["content"]
    tops = [top for entry in entries for top in entry["top_logprobs"]]
    for item in entries + tops:
        if "\ufffd" not in item["token"]:
            assert bytes(item["bytes"]).decode() == item["token"]
