"""Units of gateway/resume.py: the continuation request and how the resumed events are spliced in."""

from __future__ import annotations

import json

from tokenmill.gateway.resume import StreamProgress, fit_to_context


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_completion_continuation_and_splice():
    progress = StreamProgress("/v1/completions", {"model": "m", "prompt": "Hi", "stream": True})
    for piece in ("A", "B"):
        sent = _event({"id": "cmpl-1", "created": 5, "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        assert progress.relay(sent) == sent  # the first replica's bytes pass untouched
    body = progress.continuation()
    assert body["prompt"] == "HiAB" and body["max_tokens"] == 14  # OpenAI's default 16, minus 2 sent
    later = progress.relay(_event({"id": "cmpl-2", "created": 9, "choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}))  # fmt: skip
    spliced = json.loads(later.decode()[len("data: "):])
    assert spliced["id"] == "cmpl-1" and spliced["created"] == 5
    assert spliced["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}


def test_chat_continuation_drops_the_second_role_chunk():
    progress = StreamProgress("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}],
                                                        "max_tokens": 10})  # fmt: skip
    progress.relay(_event({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    progress.relay(_event({"id": "c", "choices": [{"index": 0, "delta": {"content": "Par"}}]}))
    body = progress.continuation()
    assert body["messages"][-1] == {"role": "assistant", "content": "Par"}
    assert body["continue_final_message"] and not body["add_generation_prompt"] and body["max_tokens"] == 9
    role_only = _event({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    assert progress.relay(role_only) == b""
    assert b'"is"' in progress.relay(_event({"id": "x", "choices": [{"index": 0, "delta": {"content": "is"}}]}))


def test_multi_choice_and_token_prompts_are_not_resumable():
    assert not StreamProgress("/v1/completions", {"prompt": "x", "n": 2}).resumable()
    assert not StreamProgress("/v1/completions", {"prompt": [1, 2]}).resumable()
    assert StreamProgress("/v1/completions", {"prompt": "x"}).resumable()


def test_fit_to_context_shrinks_the_budget_to_the_replicas_context():
    body = {"max_tokens": 295}
    assert fit_to_context(body, prompt_tokens=296, max_model_len=512) and body["max_tokens"] == 216
    assert not fit_to_context({"max_tokens": 5}, prompt_tokens=512, max_model_len=512)
