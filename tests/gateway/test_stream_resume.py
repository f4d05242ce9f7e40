"""Issue 25: a stream cut mid-way is resumed on another replica of its pool. The gateway re-issues the request
with the text already sent (completions: prompt + text; chat: the partial assistant message, continued) and
splices the rest into the same client stream with the same id and corrected usage; only when no other replica
can continue does the client get the ``upstream_stream_cut`` error event.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from gateway_helpers import STUB_COMMAND, metric_value, run_gateway, stub_backend, wait_ready


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw_resume")
    with stub_backend("solo") as solo_url:
        config = {
            "models": [
                {"name": "duo", "kind": "managed", "model": "unused", "command": STUB_COMMAND, "replicas": 2,
                 "startup_timeout_s": 60},
                {"name": "solo", "kind": "external", "urls": [solo_url]},
            ],
        }  # fmt: skip
        with run_gateway(config, tmp) as gw:
            wait_ready(gw, "duo", 2, 60)
            yield gw


def _events(gateway, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", f"{gateway.url}{path}", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        return [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]


def _received(gateway, slot_url: str) -> list[dict]:
    return httpx.get(f"{slot_url}/stub/requests", timeout=5).json()


def _continuation(gateway, marker: str) -> dict:
    """The request body a replica received carrying ``marker`` whose prompt/messages hold earlier text."""
    bodies = [b for r in gateway.pool("duo")["replicas"] for b in _received(gateway, r["url"])
              if b.get("stub_cut_once_file") == marker]  # fmt: skip
    assert len(bodies) == 2, bodies  # the original request, then its continuation on the other replica
    return max(bodies, key=lambda b: len(json.dumps(b)))  # the continuation carries the text sent so far


def test_cut_completion_stream_is_resumed_on_another_replica(gateway, tmp_path):
    marker = str(tmp_path / "cut-completion")
    body = {"model": "duo", "prompt": "Say ", "max_tokens": 6, "stream": True, "stub_cut_after": 2,
            "stub_cut_once_file": marker, "stream_options": {"include_usage": True}}  # fmt: skip
    events = _events(gateway, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(texts) == 6  # 2 from the replica that died, 4 from the one that continued
    first, second = texts[0], texts[-1].strip()
    assert first != second  # two different replicas answered
    assert len({c["id"] for c in chunks}) == 1  # one stream as the client sees it
    continuation = _continuation(gateway, marker)
    assert continuation["prompt"] == "Say " + "".join(texts[:2]) and continuation["max_tokens"] == 4
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] == 1  # "Say": one word, as if never cut
    assert metric_value(gateway.metrics(), "tokenmill:gateway_stream_resumes_total", model="duo",
                        outcome="resumed") >= 1  # fmt: skip


def test_cut_chat_stream_continues_the_partial_assistant_message(gateway, tmp_path):
    marker = str(tmp_path / "cut-chat")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="duo", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        extra_body={"stub_cut_after": 3, "stub_cut_once_file": marker},
    )  # fmt: skip
    chunks = list(stream)  # the SDK raises if the stream ends with an error event
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]  # the continuation's own role chunk is dropped
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 5
    continuation = _continuation(gateway, marker)
    sent_before_cut = "".join(pieces[:3])
    assert continuation["messages"][-1] == {"role": "assistant", "content": sent_before_cut}
    assert continuation["continue_final_message"] is True and continuation["add_generation_prompt"] is False
    assert continuation["max_tokens"] == 2


def test_cut_stream_with_no_other_replica_ends_with_an_error_event(gateway):
    body = {"model": "solo", "prompt": "hi", "max_tokens": 8, "stream": True, "stub_cut_after": 2}
    events = _events(gateway, "/v1/completions", body)
    assert "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "upstream_stream_cut" and "no other replica" in error["message"]


def test_cut_stream_with_several_choices_resumes_each_choice(gateway, tmp_path):
    # n=2 over two prompts (4 choices), cut after 2 words each: every choice is continued by its own n=1 request
    marker = str(tmp_path / "cut-n")
    body = {"model": "duo", "prompt": ["Say ", "Tell "], "n": 2, "max_tokens": 5, "stream": True,
            "stub_cut_after": 2, "stub_cut_once_file": marker, "stream_options": {"include_usage": True}}  # fmt: skip
    events = _events(gateway, "/v1/completions", body)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks) and len({c["id"] for c in chunks}) == 1
    texts: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts.setdefault(choice["index"], []).append(choice["text"])
    assert sorted(texts) == [0, 1, 2, 3] and all(len(pieces) == 5 for pieces in texts.values())
    bodies = [b for r in gateway.pool("duo")["replicas"] for b in _received(gateway, r["url"])
              if b.get("stub_cut_once_file") == marker]  # fmt: skip
    continuations = [b for b in bodies if b.get("n") == 1]
    assert len(continuations) == 4 and all(c["max_tokens"] == 3 for c in continuations)
    prompts = sorted(c["prompt"] for c in continuations)
    assert prompts == sorted(["Say ", "Say ", "Tell ", "Tell "][i] + "".join(texts[i][:2]) for i in range(4))
    usage = chunks[-1]["usage"]
    assert usage == {"prompt_tokens": 2, "completion_tokens": 20, "total_tokens": 22}  # "Say" + "Tell"; 4 x 5


def test_cut_token_id_prompt_is_continued_with_the_texts_token_ids(gateway, tmp_path):
    marker = str(tmp_path / "cut-ids")
    body = {"model": "duo", "prompt": [11, 12, 13], "max_tokens": 4, "stream": True, "stub_cut_after": 1,
            "stub_cut_once_file": marker}  # fmt: skip
    events = _events(gateway, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert len(texts) == 4
    continuation = _continuation(gateway, marker)
    replica = gateway.pool("duo")["replicas"][0]["url"]
    sent = httpx.post(f"{replica}/tokenize", json={"prompt": texts[0], "add_special_tokens": False}).json()
    assert continuation["prompt"] == [11, 12, 13, *sent["tokens"]] and continuation["max_tokens"] == 3
