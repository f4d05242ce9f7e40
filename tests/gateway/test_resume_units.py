"""Units of gateway/resume.py: the continuation request and how the resumed events are spliced in."""

from __future__ import annotations

import asyncio
import json

import pytest

from tokenmill.gateway.replica import Replica, ReplicaState
from tokenmill.gateway.resume import StreamProgress, fit_to_context


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def test_completion_continuation_and_splice():
    progress = StreamProgress("/v1/completions", {"model": "m", "prompt": "Hi", "stream": True})
    for piece in ("A", "B"):
        sent = _event({"id": "cmpl-1", "created": 5, "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        assert progress.relay(sent) == sent  # the first replica's bytes pass untouched
    body = progress.continuation(0)
    assert body["prompt"] == "HiAB" and body["max_tokens"] == 14  # OpenAI's default 16, minus 2 sent
    spliced = progress.relay(_event({"id": "cmpl-2", "created": 9, "choices": [{"index": 0, "text": "C"}]}))
    assert json.loads(spliced.decode()[len("data: "):])["id"] == "cmpl-1"
    held = progress.relay(_event({"id": "cmpl-2", "created": 9, "choices": [], "usage": {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}) + b"data: [DONE]\n\n")  # fmt: skip
    assert held == b""  # usage and [DONE] wait until every choice is done
    assert progress.closing() == b"data: [DONE]\n\n"  # the client did not ask for usage


def test_resumed_stream_ends_with_one_usage_chunk_counted_as_one_answer():
    progress = StreamProgress("/v1/completions", {"prompt": "Hi", "max_tokens": 6,
                                                  "stream_options": {"include_usage": True}})  # fmt: skip
    progress.relay(_event({"id": "cmpl-1", "created": 5, "model": "m", "choices": [{"index": 0, "text": "A"}]}))
    progress.relay(_event({"id": "cmpl-1", "created": 5, "model": "m", "choices": [{"index": 0, "text": "B"}]}))
    assert progress.continuation(0)["max_tokens"] == 4
    progress.relay(_event({"id": "x", "choices": [{"index": 0, "text": "C", "finish_reason": "length"}]}))
    progress.relay(_event({"id": "x", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}))
    events = progress.closing().decode().split("\n\n")
    last = json.loads(events[0][len("data: "):])
    assert last["id"] == "cmpl-1" and last["model"] == "m" and last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}  # 2 moved out of the prompt
    assert events[1] == "data: [DONE]"


def test_chat_continuation_drops_the_second_role_chunk():
    progress = StreamProgress("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}],
                                                        "max_tokens": 10})  # fmt: skip
    progress.relay(_event({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    progress.relay(_event({"id": "c", "choices": [{"index": 0, "delta": {"content": "Par"}}]}))
    body = progress.continuation(0)
    assert body["messages"][-1] == {"role": "assistant", "content": "Par"}
    assert body["continue_final_message"] and not body["add_generation_prompt"] and body["max_tokens"] == 9
    role_only = _event({"id": "x", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    assert progress.relay(role_only) == b""
    assert b'"is"' in progress.relay(_event({"id": "x", "choices": [{"index": 0, "delta": {"content": "is"}}]}))


def test_every_unfinished_choice_gets_its_own_single_choice_continuation():
    # n=2 over two prompts: choice index = prompt index * n + sample index, as OpenAI numbers them.
    progress = StreamProgress("/v1/completions", {"prompt": ["P", "Q"], "n": 2, "max_tokens": 5})
    assert progress.resumable() and progress.num_choices == 4
    for index, piece in ((0, "a"), (1, "b"), (2, "c"), (3, "d")):
        progress.relay(_event({"id": "s", "choices": [{"index": index, "text": piece}]}))
    progress.relay(_event({"id": "s", "choices": [{"index": 1, "text": "", "finish_reason": "stop"}]}))
    assert progress.pending() == [0, 2, 3]
    body = progress.continuation(2)
    assert (body["prompt"], body["n"], body["max_tokens"]) == ("Qc", 1, 4)  # prompt 1's text + choice 2's text
    spliced = progress.relay(_event({"id": "z", "choices": [{"index": 0, "text": "!", "finish_reason": "length"}]}))
    assert json.loads(spliced.decode()[len("data: "):])["choices"][0]["index"] == 2  # spliced as choice 2
    assert progress.pending() == [0, 3] and progress.text_of(2) == "c!"


def test_token_id_prompt_continues_with_the_sent_texts_token_ids():
    progress = StreamProgress("/v1/completions", {"prompt": [7, 8, 9], "max_tokens": 4})
    progress.relay(_event({"id": "t", "choices": [{"index": 0, "text": " one"}]}))
    assert progress.resumable() and progress.needs_token_ids(0)
    with pytest.raises(ValueError, match="token ids"):
        progress.continuation(0)
    assert progress.continuation(0, text_token_ids=[42])["prompt"] == [7, 8, 9, 42]


def test_chat_with_several_choices_continues_each_partial_message():
    progress = StreamProgress("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "n": 2})
    for index, piece in ((0, "x"), (1, "y")):
        progress.relay(_event({"id": "c", "choices": [{"index": index, "delta": {"role": "assistant",
                                                                                 "content": piece}}]}))  # fmt: skip
    body = progress.continuation(1)
    assert body["n"] == 1 and body["messages"][-1] == {"role": "assistant", "content": "y"}


def test_echo_best_of_and_malformed_prompts_are_not_resumed():
    assert not StreamProgress("/v1/completions", {"prompt": "x", "echo": True}).resumable()
    assert not StreamProgress("/v1/completions", {"prompt": "x", "n": 1, "best_of": 3}).resumable()
    assert not StreamProgress("/v1/completions", {"prompt": [1, "a"]}).resumable()
    assert not StreamProgress("/v1/completions", {"prompt": []}).resumable()
    assert StreamProgress("/v1/completions", {"prompt": [[1, 2], [3]], "n": 3}).num_choices == 6


def test_fit_to_context_shrinks_the_budget_to_the_replicas_context():
    body = {"max_tokens": 295}
    assert fit_to_context(body, prompt_tokens=296, max_model_len=512) and body["max_tokens"] == 216
    assert not fit_to_context({"max_tokens": 5}, prompt_tokens=512, max_model_len=512)


def _proxy_and_pool(states: list[ReplicaState]):
    from tokenmill.gateway.config import HealthConfig, PoolConfig
    from tokenmill.gateway.health import HealthTracker
    from tokenmill.gateway.metrics import GatewayMetrics
    from tokenmill.gateway.pools import Pool
    from tokenmill.gateway.proxy import Proxy, ProxyRequest

    metrics = GatewayMetrics()
    pool = Pool(PoolConfig(name="m", kind="external", urls=["http://127.0.0.1:1"]), metrics)
    pool.replicas = [Replica(slot=f"m-{i}", url=f"http://127.0.0.1:{i + 1}", state=s) for i, s in enumerate(states)]
    proxy = Proxy(None, HealthTracker(HealthConfig(), metrics), metrics, max_attempts=3,  # type: ignore[arg-type]
                  wait_for_replica_s=5.0)  # fmt: skip
    return proxy, pool, ProxyRequest("/v1/completions", {}, {}, None, True, lambda status: None)


def test_a_resume_waits_for_the_other_replica_while_only_the_dead_one_looks_ready():
    # Seen on a loaded box: the killed process still READY (its exit not noticed yet), the other replica ejected
    # by a slow health check for a moment; the resume gave up at once and the client got upstream_stream_cut.
    proxy, pool, request = _proxy_and_pool([ReplicaState.READY, ReplicaState.EJECTED])
    dead, other = pool.replicas

    async def scenario():
        async def readmit():
            await asyncio.sleep(0.3)
            pool.set_state(other, ReplicaState.READY)

        task = asyncio.create_task(readmit())
        chosen = await proxy._other_replica(pool, request, [dead.url])
        await task
        return chosen

    assert asyncio.run(scenario()) is other


def test_a_resume_gives_up_at_once_when_no_other_replica_exists():
    proxy, pool, request = _proxy_and_pool([ReplicaState.READY, ReplicaState.FAILED])
    # never the process that cut the stream, though it still looks ready; the failed one does not come back
    assert asyncio.run(proxy._other_replica(pool, request, [pool.replicas[0].url])) is None
