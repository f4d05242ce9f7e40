"""The engine core in its own process: its death turns /health 503 and the server exits non-zero; a client
disconnect aborts and frees KV across the boundary; stop strings cut text and tokens exactly as the in-thread
engine does (the core checks them; the API process decodes the text)."""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest
from server_process import ServerProcess, metric_value

MODEL = "tiny-llama"
COMMON = ("--max-model-len", "256", "--served-model-name", MODEL)
CORE_PID = re.compile(r"engine core in its own process \(pid (\d+)\)")


def _wait_metric(url: str, name: str, value: float, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        seen = metric_value(httpx.get(url + "/metrics", timeout=30).text, name)
        if seen == value or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_killed_engine_core_turns_health_503_and_exits_nonzero(tiny_llama_dir, tmp_path):
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", *COMMON, "--engine-death-grace", "3")
    try:
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        core_pid = int(CORE_PID.search(server.log()).group(1))
        os.kill(core_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/health", timeout=30).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        health = httpx.get(server.url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                             timeout=30)
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "engine_dead"
        assert server.wait(timeout=60) != 0
        assert "engine loop died" in server.log()
    finally:
        server.stop()


def test_disconnect_aborts_in_the_core_and_frees_kv(shared_server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=shared_server.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert metric_value(client.get("/metrics").text, "tokenmill:num_requests_running") >= 1
    assert _wait_metric(shared_server.url, "tokenmill:num_requests_running", 0) == 0
    assert _wait_metric(shared_server.url, "tokenmill:kv_cache_usage_perc", 0) == 0


@pytest.fixture(scope="module")
def in_thread_server(tiny_llama_dir, tmp_path_factory):
    server = ServerProcess(tiny_llama_dir, tmp_path_factory.mktemp("in_thread") / "server.log", *COMMON,
                           "--no-engine-process")
    yield server
    server.stop()


@pytest.mark.parametrize("include_stop", [False, True])
def test_stop_strings_match_the_in_thread_engine(shared_server, in_thread_server, include_stop):
    base = {"model": MODEL, "prompt": "The history of the city", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    free = httpx.post(shared_server.url + "/v1/completions", json=base, timeout=60).json()
    text = free["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # a stop string the greedy text is sure to contain
    assert stop.strip(), f"the greedy text {text!r} has no usable middle"
    body = {**base, "stop": [stop], "include_stop_str_in_output": include_stop}
    results = []
    for server in (shared_server, in_thread_server):
        plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            chunks = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
        streamed = "".join(httpx.Response(200, content=c).json()["choices"][0]["text"] for c in chunks)
        choice = plain["choices"][0]
        results.append((choice["text"], choice["finish_reason"], plain["usage"]["completion_tokens"], streamed))
    core, thread = results
    assert core == thread
    assert core[1] == "stop" and core[0] == core[3]
    assert core[0].endswith(stop) == include_stop and text.startswith(core[0].removesuffix(stop))
