"""Acceptance 2 and 4: concurrent streams are batched into shared engine steps; a client that disconnects
(streaming or not) gets its engine request aborted, and the KV cache and running count return to 0.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
from server_process import metric_value

MODEL = "tiny-llama"


def _metrics(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=30).text


def _wait_idle(server, timeout: float = 60.0) -> str:
    """Poll /metrics until nothing runs and the KV cache is empty (bounded wait, no timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        text = _metrics(server)
        idle = (
            metric_value(text, "tokenmill:num_requests_running") == 0
            and metric_value(text, "tokenmill:num_requests_waiting") == 0
            and metric_value(text, "tokenmill:kv_cache_usage_perc") == 0
        )
        if idle or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_64_concurrent_streams_are_batched(shared_server):
    num_requests, max_tokens = 64, 8
    steps_before = metric_value(_wait_idle(shared_server), "tokenmill:engine_steps_total")

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=max_tokens,
            temperature=0.8, seed=i, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    async def main() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=shared_server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=300) as client:
            return await asyncio.gather(*[one(client, i) for i in range(num_requests)])

    results = asyncio.run(main())
    assert len(results) == num_requests
    assert all(tokens == max_tokens for _, tokens in results)
    steps = metric_value(_wait_idle(shared_server), "tokenmill:engine_steps_total") - steps_before
    total_tokens = num_requests * max_tokens
    # Unbatched, every generated token would need its own step; batching shares steps between requests.
    assert 0 < steps < total_tokens / 4, f"{steps} steps for {total_tokens} tokens"


def test_stream_disconnect_frees_kv_cache(shared_server):
    aborted_before = _aborts(shared_server)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=shared_server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["text"] is not None
            # leaving the block closes the connection mid-stream
    text = _wait_idle(shared_server)
    assert metric_value(text, "tokenmill:kv_cache_usage_perc") == 0
    assert metric_value(text, "tokenmill:num_requests_running") == 0
    assert _aborts(shared_server) == aborted_before + 1
    assert "completions status=499" in shared_server.log()


def test_non_stream_disconnect_aborts_request(shared_server):
    aborted_before = _aborts(shared_server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 230, "ignore_eos": True}
    with httpx.Client(base_url=shared_server.url, timeout=httpx.Timeout(60, read=0.2)) as client:
        try:
            client.post("/v1/chat/completions", json=body)
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection while the server is generating
    text = _wait_idle(shared_server)
    assert metric_value(text, "tokenmill:kv_cache_usage_perc") == 0
    assert metric_value(text, "tokenmill:num_requests_running") == 0
    assert _aborts(shared_server) == aborted_before + 1
    assert "chat status=499" in shared_server.log()


def _aborts(server) -> float:
    try:
        return metric_value(_metrics(server), "tokenmill:request_success_total", finished_reason="abort")
    except KeyError:
        return 0.0
