"""Acceptance 5 and backpressure: API keys, 429 when the waiting queue is full, SIGTERM drain (the stream
completes, exit 0) and an injected engine fault (/health 503, pending request 500, non-zero exit).

Each scenario needs its own server flags, so each starts its own subprocess.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_process import ServerProcess

MODEL = "tiny-llama"
KEY = "s3cret-key"
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 230, "stream": True, "ignore_eos": True}
SHORT = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
COMMON = ("--max-model-len", "256", "--served-model-name", MODEL)


@pytest.fixture(scope="module")
def keyed_server(tiny_llama_dir, tmp_path_factory):
    server = ServerProcess(
        tiny_llama_dir, tmp_path_factory.mktemp("keyed") / "server.log", *COMMON,
        "--secure-metrics", "--max-num-seqs", "1", "--max-waiting-requests", "1",
        env={"TOKENMILL_API_KEY": KEY},
    )
    yield server
    server.stop()


def test_api_key_required(keyed_server):
    for key in (None, "wrong-key", KEY + "x", KEY[:-1]):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        response = httpx.post(keyed_server.url + "/v1/completions", json=SHORT, headers=headers, timeout=30)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0) as good:
        assert good.completions.create(**SHORT).choices[0].text is not None
        assert good.models.list().data[0].id == MODEL


def test_health_open_metrics_secured(keyed_server):
    assert httpx.get(keyed_server.url + "/health", timeout=30).status_code == 200
    assert httpx.get(keyed_server.url + "/metrics", timeout=30).status_code == 401
    authorized = httpx.get(keyed_server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert authorized.status_code == 200 and "tokenmill:engine_steps_total" in authorized.text


def test_queue_full_is_429_then_recovers(keyed_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed_server.url, headers=headers, timeout=60) as running_client, \
            httpx.Client(base_url=keyed_server.url, headers=headers, timeout=60) as waiting_client:
        with running_client.stream("POST", "/v1/completions", json=LONG) as running:
            assert running.status_code == 200
            # Keep the line iterator referenced: a collected iterator closes the response (a disconnect).
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is running now
            # max_num_seqs=1: the second request is accepted (headers arrive) but has to wait
            with waiting_client.stream("POST", "/v1/completions", json=LONG) as waiting:
                assert waiting.status_code == 200
                rejected = httpx.post(keyed_server.url + "/v1/completions", json=SHORT, headers=headers, timeout=60)
                assert rejected.status_code == 429
                error = rejected.json()["error"]
                assert error["type"] == "rate_limit_error" and "max_waiting_requests=1" in error["message"]
    ok = httpx.post(keyed_server.url + "/v1/completions", json=SHORT, headers=headers, timeout=60)
    assert ok.status_code == 200


def test_sigterm_drains_stream_and_exits_zero(tiny_llama_dir, tmp_path):
    # 20 ms per step: the stream provably outlives the refused request and the /health check after SIGTERM (the
    # tiny model alone can finish its 230 tokens first, and the drained server is then gone).
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", *COMMON, "--drain-timeout", "60",
                           env={"TOKENMILL_TEST_STEP_DELAY_S": "0.02"})
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=LONG) as response:
                assert response.status_code == 200
                lines = response.iter_lines()
                events = [next(line for line in lines if line.startswith("data: "))]
                server.terminate()
                refused = httpx.post(server.url + "/v1/completions", json=SHORT, timeout=30)
                assert refused.status_code == 503
                assert refused.json()["error"]["type"] == "service_unavailable"
                assert httpx.get(server.url + "/health", timeout=30).status_code == 503
                events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(c["choices"][0]["text"]) for c in chunks) > 0
        assert server.wait(timeout=60) == 0
        assert "drain complete" in server.log()
    finally:
        server.stop()


def test_injected_engine_fault_turns_health_503_and_exits_nonzero(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path / "server.log", *COMMON, "--engine-death-grace", "5",
        env={"TOKENMILL_TEST_FAULT_AFTER_STEPS": "3"},
    )
    try:
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        pending = httpx.post(server.url + "/v1/completions", json={**SHORT, "max_tokens": 20, "ignore_eos": True},
                             timeout=60)
        assert pending.status_code == 500
        assert pending.json()["error"]["code"] == "engine_dead"
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        assert server.wait(timeout=60) != 0
        assert "engine loop died" in server.log()
    finally:
        server.stop()
