"""In-process tests of the server's parts: strict protocol models, params mapping, error shapes, per-app metrics,
and AsyncLLM over a real tiny LLMEngine (streaming, abort on close, backpressure, engine fault).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tokenmill.config import EngineConfig
from tokenmill.engine.async_llm import AsyncLLM, EngineDeadError, EngineQueueFullError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.app import build_app
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import BadRequestError
from tokenmill.server.params import chat_params, completion_params
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest


@pytest.fixture(scope="module")
def make_engine(tiny_llama_dir):
    def make(**overrides) -> LLMEngine:
        kwargs = dict(model=str(tiny_llama_dir), device="cpu", max_model_len=128, served_model_name="tiny")
        return LLMEngine(EngineConfig.from_kwargs(**{**kwargs, **overrides}))

    return make


# ---- protocol and params -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("top_k", 2.0), ("n", "2"), ("temperature", "0.5"), ("ignore_eos", 1),
                                         ("temperature", float("nan")), ("top_p", float("inf"))])
def test_typed_fields_are_strict(field, value):
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **{field: value})


def test_unknown_fields_are_tolerated():
    request = CompletionRequest.model_validate({"prompt": "x", "some_future_field": {"a": 1}, "temperature": 1})
    assert request.temperature == 1.0 and request.model_extra == {"some_future_field": {"a": 1}}


def test_completion_params_mapping():
    params = completion_params(CompletionRequest(prompt="x", max_tokens=5, top_k=0, stop="END", logprobs=2, seed=3))
    assert (params.max_tokens, params.top_k, params.stop, params.logprobs, params.seed) == (5, -1, ["END"], 2, 3)
    with pytest.raises(BadRequestError) as info:
        completion_params(CompletionRequest(prompt="x", temperature=-1.0))
    assert info.value.param == "temperature" and "temperature must be >= 0" in info.value.message


def test_chat_params_rejects_unbuilt_features():
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(BadRequestError, match="'schema'"):
        chat_params(ChatCompletionRequest.model_validate({**base, "response_format": {"type": "json_schema"}}))
    params = chat_params(ChatCompletionRequest.model_validate({**base, "response_format": {"type": "json_object"}}))
    assert params.structured_outputs.json_object
    with pytest.raises(BadRequestError):
        chat_params(ChatCompletionRequest.model_validate({**base, "max_tokens": 3, "max_completion_tokens": 4}))
    params = chat_params(ChatCompletionRequest.model_validate({**base, "max_completion_tokens": 4, "logprobs": True,
                                                               "top_logprobs": 3}))
    assert params.max_tokens == 4 and params.logprobs == 3
    assert chat_params(ChatCompletionRequest.model_validate(base)).max_tokens is None  # up to the context


def test_server_config_validates():
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="drain_timeout"):
        ServerConfig(drain_timeout=-1)


# ---- AsyncLLM over the real engine ---------------------------------------------------------------------------
def test_async_llm_streams_and_batches(make_engine):
    async def main(llm: AsyncLLM) -> list[list]:
        params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

        async def collect(i: int) -> list:
            return [out async for out in llm.generate([5, 6, 7 + i], params, f"r{i}")]

        return await asyncio.gather(*[collect(i) for i in range(4)])

    llm = AsyncLLM(make_engine())
    llm.start()
    try:
        runs = asyncio.run(main(llm))
    finally:
        llm.shutdown()
    for outputs in runs:
        assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
    assert llm.snapshot.num_steps < 4 * 6  # four requests shared steps
    assert not llm.is_healthy  # shut down


def test_async_llm_abort_on_close_frees_blocks(make_engine):
    async def main(llm: AsyncLLM) -> None:
        params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        stream = llm.generate([5, 6, 7], params, "abort-me")
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()  # the consumer goes away
        for _ in range(200):
            if llm.snapshot.num_running == 0 and llm.snapshot.kv_cache_usage == 0:
                return
            await asyncio.sleep(0.01)

    llm = AsyncLLM(make_engine())
    llm.start()
    try:
        asyncio.run(main(llm))
        assert llm.snapshot.num_running == 0 and llm.snapshot.kv_cache_usage == 0
        assert llm.snapshot.generation_tokens < 100
    finally:
        llm.shutdown()


def test_async_llm_backpressure_and_invalid_request(make_engine):
    async def main(llm: AsyncLLM) -> None:
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        running = await llm.add_request("a", [5, 6], long)
        await running.get()
        waiting = await llm.add_request("b", [5, 6], long)  # max_num_seqs=1: it waits
        with pytest.raises(EngineQueueFullError, match="max_waiting_requests=1"):
            await llm.add_request("c", [5, 6], long)
        with pytest.raises(ValueError, match="max_model_len"):
            await llm.add_request("d", [5, 6], SamplingParams(max_tokens=1000))
        running.abort()
        waiting.abort()

    llm = AsyncLLM(make_engine(max_num_seqs=1), max_waiting_requests=1)
    llm.start()
    try:
        asyncio.run(main(llm))
    finally:
        llm.shutdown()


def test_async_llm_engine_fault_fails_pending_requests(make_engine):
    deaths: list[BaseException] = []

    async def main(llm: AsyncLLM) -> None:
        with pytest.raises(EngineDeadError, match="injected engine fault"):
            async for _ in llm.generate([5, 6], SamplingParams(max_tokens=20, ignore_eos=True), "x"):
                pass
        with pytest.raises(EngineDeadError):
            await llm.add_request("y", [5, 6], SamplingParams(max_tokens=2))

    llm = AsyncLLM(make_engine(), fault_after_steps=2, on_dead=deaths.append)
    llm.start()
    asyncio.run(main(llm))
    llm.shutdown()  # joins the engine thread
    assert not llm.is_healthy and len(deaths) == 1


# ---- two apps in one process ---------------------------------------------------------------------------------
def test_two_apps_have_separate_metric_registries(make_engine):
    apps = [build_app(AsyncLLM(make_engine(served_model_name=name)), ServerConfig()) for name in ("one", "two")]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        ok = first.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["model"] == "one"
        first_metrics, second_metrics = first.get("/metrics").text, second.get("/metrics").text
    assert 'tokenmill:request_success_total{finished_reason="length",model_name="one"} 1.0' in first_metrics
    assert "request_success_total{" not in second_metrics
    assert 'tokenmill:generation_tokens_total{model_name="two"} 0.0' in second_metrics


def test_engine_death_mid_stream_sends_error_event(make_engine):
    app = build_app(AsyncLLM(make_engine(), fault_after_steps=3), ServerConfig(engine_death_grace=0))
    body = {"prompt": "hi", "max_tokens": 20, "ignore_eos": True, "stream": True}
    with TestClient(app) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200  # headers went out before the engine died
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_dead" and error["type"] == "server_error"
        assert client.get("/health").status_code == 503
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 500
    assert app.state.ctx.lifecycle.exit_code == 1
