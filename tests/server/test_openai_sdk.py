"""Acceptance 1: the official `openai` SDK (sync and async) against a real `tokenmill serve` subprocess.

Completions, chat, streaming chat with usage, n=2, stop, logprobs, seed reproducibility, streamed == non-streamed.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

MODEL = "tiny-llama"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a city."}]


@pytest.fixture(scope="module")
def client(shared_server):
    with openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion_text_and_usage(client):
    result = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert result.object == "text_completion" and result.model == MODEL
    [choice] = result.choices
    assert choice.finish_reason == "length" and isinstance(choice.text, str) and choice.text
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == result.usage.prompt_tokens + 6


def test_completion_list_of_prompts_and_token_ids(client):
    result = client.completions.create(model=MODEL, prompt=["Paris is", "Once upon"], max_tokens=3, temperature=0, n=2,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3


def test_completion_echo_prepends_prompt(client):
    result = client.completions.create(model=MODEL, prompt="Paris is the", max_tokens=3, temperature=0, echo=True)
    assert result.choices[0].text.startswith("Paris is the")


def test_chat_completion(client):
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert result.object == "chat.completion"
    [choice] = result.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert result.usage.completion_tokens == 5 and result.usage.prompt_tokens > 0


def test_chat_text_parts_content(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Name"}, {"type": "text", "text": "a city."}]}]
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert result.choices[0].message.content is not None


def test_streaming_chat_with_usage_equals_non_streamed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.8, seed=1234)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunks[0].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_completion_equals_non_streamed(client):
    kwargs = dict(model=MODEL, prompt="Continuous batching", max_tokens=10, temperature=0.9, seed=7)
    whole = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_n2_returns_two_choices(client):
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4, temperature=1.0,
                                            seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1]
    assert result.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4, seed=3,
                                                 stream=True, extra_body={"ignore_eos": True}))
    by_index = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert by_index == {c.index: c.message.content for c in result.choices}


def test_seed_reproducible(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=99)
    first = client.completions.create(**kwargs).choices[0].text
    second = client.completions.create(**kwargs).choices[0].text
    assert first == second


def test_stop_string_cuts_text(client):
    base = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0,
                extra_body={"ignore_eos": True})
    full = client.completions.create(**base).choices[0].text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if full[i:i + 2].strip())
    cut = client.completions.create(**base, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_completion_logprobs(client):
    result = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(abs(max(top.values()) - v) < 1e-4 for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_chat_logprobs(client):
    result = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_async_client_concurrent_chat_and_stream(shared_server):
    async def main() -> tuple[list[str], str]:
        async with openai.AsyncOpenAI(base_url=shared_server.url + "/v1", api_key="unused", max_retries=0) as c:
            kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.7, seed=11)
            results = await asyncio.gather(*[c.chat.completions.create(**kwargs) for _ in range(4)])
            stream = await c.chat.completions.create(**kwargs, stream=True)
            streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
            return [r.choices[0].message.content for r in results], streamed

    texts, streamed = asyncio.run(main())
    assert len(set(texts)) == 1  # same seed, same text, even when batched together
    assert streamed == texts[0]


def test_streaming_logprobs_and_stop_match_non_streamed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens == 10

    full = whole.choices[0].message.content
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full[i:i + 2].strip())
    stopped = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                  stop=stop, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].delta.content or "" for c in stopped if c.choices)
    assert text == full[: full.index(stop)]
    assert [c.choices[0].finish_reason for c in stopped if c.choices and c.choices[0].finish_reason] == ["stop"]
