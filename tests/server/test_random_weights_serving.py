"""A random-weight preset wider than any embedded tokenizer serves through its synthetic tokenizer (no 500)."""

from __future__ import annotations

import re

import openai
import pytest
from server_process import ServerProcess

MODEL = "tiny-llama3"
WORD = re.compile(r"^(t\d+|<unk>)$")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = tmp_path_factory.mktemp("random_weights") / "server.log"
    server = ServerProcess(None, log, "--random-weights", MODEL, "--max-model-len", "128")
    try:
        with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
            yield c
    finally:
        server.stop()


def test_completion_gives_synthetic_words_and_exact_prompt_length(client):
    result = client.completions.create(model=MODEL, prompt="t5 t6 t7 t128000", max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.usage.prompt_tokens == 4 and result.usage.completion_tokens == 8
    words = result.choices[0].text.split()
    assert words and all(WORD.match(w) for w in words)


def test_streamed_chat_matches_non_streamed(client):
    messages = [{"role": "user", "content": "t10 t11 t12"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].finish_reason == "length"
    assert streamed == whole.choices[0].message.content and streamed.strip()


def test_json_output_the_synthetic_words_cannot_spell_is_a_400_naming_it(client):
    """No t<id> word holds a brace: enforcing JSON is impossible, so the request is refused (not decoded into
    ids the grammar rejects), and the next request works."""
    with pytest.raises(openai.BadRequestError, match="no token of the model's vocabulary can start"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t10"}],
                                       max_completion_tokens=4, response_format={"type": "json_object"})
    result = client.completions.create(model=MODEL, prompt="t5 t6", max_tokens=2, extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 2
