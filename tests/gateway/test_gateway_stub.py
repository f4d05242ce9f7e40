"""The gateway as a real subprocess in front of stand-in backends (fast to start): routing, aliases, auto,
keys and rate limits, fallback, affinity, streaming passthrough, a cut stream's error event, restart on crash.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading

import httpx
import openai
import pytest
from gateway_helpers import (
    STUB_COMMAND,
    free_port,
    metric_value,
    run_gateway,
    stub_backend,
    wait_ready,
    wait_until,
)

GW_KEY = "gw-team-key"
SLOW_KEY = "gw-slow-key"
BACKEND_KEY = "backend-secret"
AUTH = {"authorization": f"Bearer {GW_KEY}"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw_stub")
    with stub_backend("beta", token_delay=0.01, api_key=BACKEND_KEY) as beta_url:
        config = {
            "health": {"interval_s": 0.5, "timeout_s": 1.0, "failure_threshold": 2},
            "keys": [
                {"name": "team", "key": GW_KEY},
                {"name": "slow", "key": SLOW_KEY, "rate_limit_rps": 0.2, "burst": 2},
            ],
            "models": [
                {
                    "name": "alpha",
                    "kind": "managed",
                    "model": "unused",
                    "command": STUB_COMMAND,
                    "replicas": 2,
                    "balancer": "affinity",
                    "startup_timeout_s": 60,
                },
                {"name": "beta", "kind": "external", "urls": [beta_url], "api_key": BACKEND_KEY},
                {
                    "name": "gamma",
                    "kind": "external",
                    "urls": [f"http://127.0.0.1:{free_port()}"],
                    "fallback": "beta",
                },
            ],  # fmt: skip
            "aliases": {"gpt-4o-mini": "alpha"},
            "virtual_models": [{"name": "auto", "fast": "alpha", "strong": "beta", "threshold": 0.5}],
        }
        with run_gateway(config, tmp) as gw:
            wait_ready(gw, "alpha", 2, 60)
            yield gw


def post(gw, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{gw.url}{path}", json=body, headers=headers if headers is not None else AUTH, timeout=30
    )


def test_models_lists_pools_aliases_and_virtual_models(gateway):
    data = httpx.get(f"{gateway.url}/v1/models", headers=AUTH).json()
    kinds = {m["id"]: m["tokenmill"]["kind"] for m in data["data"]}
    assert kinds == {
        "alpha": "model",
        "beta": "model",
        "gamma": "model",
        "gpt-4o-mini": "alias",
        "auto": "virtual",
    }
    assert data["object"] == "list"


def test_keys_are_checked_and_errors_are_openai_shaped(gateway):
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 2}
    missing = post(gateway, "/v1/completions", body, headers={})
    wrong = post(gateway, "/v1/completions", body, headers={"authorization": "Bearer nope"})
    assert missing.status_code == 401 and wrong.status_code == 401
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    unknown = post(gateway, "/v1/completions", {**body, "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(f"{gateway.url}/v1/completions", content=b"{not json", headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert post(gateway, "/v1/completions", body).status_code == 200  # the next valid request succeeds


def test_rate_limit_per_key_gives_429(gateway):
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 1}
    slow = {"authorization": f"Bearer {SLOW_KEY}"}
    statuses = [post(gateway, "/v1/completions", body, headers=slow).status_code for _ in range(3)]
    assert statuses[:2] == [200, 200]  # the burst
    assert statuses[2] == 429
    limited = post(gateway, "/v1/completions", body, headers=slow)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert post(gateway, "/v1/completions", body).status_code == 200  # other keys are not limited
    assert metric_value(gateway.metrics(), "tokenmill:gateway_rate_limited_total", key="slow") >= 2


def test_routing_by_name_alias_and_auto(gateway):
    by_name = post(gateway, "/v1/completions", {"model": "beta", "prompt": "hi", "max_tokens": 2})
    assert by_name.status_code == 200, by_name.text
    assert by_name.json()["choices"][0]["text"].startswith("beta@")  # the backend key was swapped in
    alias = post(
        gateway,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
    )
    assert alias.headers["x-tokenmill-routed-model"] == "alpha"
    assert alias.headers["x-tokenmill-route-reason"] == "alias"
    simple = post(
        gateway, "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert simple.headers["x-tokenmill-routed-model"] == "alpha"
    assert simple.json()["choices"][0]["message"]["content"].startswith("alpha@")
    hard_msg = [{"role": "user", "content": "Prove step by step that the algorithm terminates."}]
    hard = post(gateway, "/v1/chat/completions", {"model": "auto", "messages": hard_msg})
    assert hard.headers["x-tokenmill-routed-model"] == "beta"
    assert hard.headers["x-tokenmill-route-reason"] == "auto:strong"
    assert float(hard.headers["x-tokenmill-complexity-score"]) >= 0.5
    metrics = gateway.metrics()
    assert metric_value(metrics, "tokenmill:gateway_routed_requests_total", requested_model="auto",
                        routed_model="beta", reason="auto:strong") >= 1  # fmt: skip


def test_fallback_when_a_model_has_no_live_backend(gateway):
    resp = post(gateway, "/v1/completions", {"model": "gamma", "prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-tokenmill-routed-model"] == "beta"
    assert resp.headers["x-tokenmill-route-reason"] == "fallback"
    assert metric_value(gateway.metrics(), "tokenmill:gateway_fallbacks_total", model="gamma") >= 1


def test_session_affinity_keeps_a_session_on_one_replica(gateway):
    served = set()
    for _ in range(6):
        headers = {**AUTH, "x-session-id": "session-42"}
        resp = post(gateway, "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 1}, headers)
        served.add(resp.json()["choices"][0]["text"])
    assert len(served) == 1
    prefixes = {
        post(
            gateway, "/v1/completions", {"model": "alpha", "prompt": "same system prompt", "max_tokens": 1}
        ).json()["choices"][0]["text"]
        for _ in range(4)
    }
    assert len(prefixes) == 1


def test_openai_sdk_streaming_passthrough(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=GW_KEY, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [text.split()[0]] * 5 and text.startswith("beta@")
    whole = client.completions.create(model="alpha", prompt="hi", max_tokens=3)
    assert whole.choices[0].text.startswith("alpha@")


def test_stream_cut_after_first_byte_ends_with_an_error_event(gateway):
    body = {"model": "beta", "prompt": "hi", "max_tokens": 8, "stream": True, "stub_cut_after": 2}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, headers=AUTH, timeout=30) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert len(events) == 3  # two good chunks, then the error event instead of a silent cut
    assert json.loads(events[0])["choices"][0]["text"].startswith("beta@")
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_stream_cut"
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=GW_KEY, max_retries=0)
    stream = client.completions.create(model="beta", prompt="hi", max_tokens=8, stream=True,
                                       extra_body={"stub_cut_after": 2})  # fmt: skip
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_crashed_managed_replica_is_restarted(gateway):
    before = {r["slot"]: r["pid"] for r in wait_ready(gateway, "alpha", 2, 30)}
    victim_slot, victim_pid = sorted(before.items())[0]
    os.kill(victim_pid, signal.SIGKILL)
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 1}
    # Requests keep succeeding while the replica is down: the other one serves (retry before first byte).
    for _ in range(10):
        assert post(gateway, "/v1/completions", body).status_code == 200

    def restarted() -> bool:
        ready = {r["slot"]: r for r in gateway.ready_replicas("alpha")}
        return (
            victim_slot in ready
            and ready[victim_slot]["pid"] != victim_pid
            and ready[victim_slot]["restarts"] >= 1
        )

    wait_until(restarted, 60, "the killed replica to come back")
    assert metric_value(gateway.metrics(), "tokenmill:gateway_replica_restarts_total", model="alpha") >= 1
    assert post(gateway, "/v1/completions", body).status_code == 200


def test_autoscaler_scales_up_on_load_scraped_from_replica_metrics(tmp_path):
    # One replica is ready throughout, so nothing queues at the gateway: the only load signal is the replica's
    # tokenmill:num_requests_running on /metrics.
    config = {
        "models": [{
            "name": "elastic", "kind": "managed", "model": "unused",
            "command": [*STUB_COMMAND, "--token-delay", "0.05"], "replicas": 1,
            "autoscale": {"min_replicas": 1, "max_replicas": 2, "target_load_per_replica": 2, "interval_s": 0.3,
                          "scale_up_cooldown_s": 0.5, "scale_down_cooldown_s": 1, "idle_timeout_s": 2},
        }],
    }  # fmt: skip
    with run_gateway(config, tmp_path) as gw:
        wait_ready(gw, "elastic", 1, 60)
        body = {"model": "elastic", "prompt": "hi", "max_tokens": 20}  # ~1 s each at 0.05 s per token
        stop = threading.Event()
        statuses: list[int] = []

        def client_loop() -> None:
            while not stop.is_set():
                statuses.append(post(gw, "/v1/completions", body, {}).status_code)

        with concurrent.futures.ThreadPoolExecutor(6) as workers:
            for _ in range(6):
                workers.submit(client_loop)
            try:
                wait_until(lambda: len(gw.ready_replicas("elastic")) == 2, 60, "scale-up to max under load")
            finally:
                stop.set()
        assert statuses and set(statuses) == {200}
        assert "scaling up from 1 to 2 replicas (load)" in gw.log()
        wait_until(lambda: len(gw.pool("elastic")["replicas"]) == 1, 30, "back to min_replicas after idle")
        metrics = gw.metrics()
        assert metric_value(metrics, "tokenmill:gateway_scale_events_total", model="elastic", direction="down",
                            reason="idle") == 1  # fmt: skip
        assert metric_value(metrics, "tokenmill:gateway_queued_requests", model="elastic") == 0


def test_external_replica_is_ejected_by_health_checks_and_readmitted(tmp_path):
    port = free_port()
    config = {
        "health": {"interval_s": 0.3, "timeout_s": 1.0, "failure_threshold": 2},
        "models": [{"name": "ext", "kind": "external", "urls": [f"http://127.0.0.1:{port}"]}],
    }
    body = {"model": "ext", "prompt": "hi", "max_tokens": 1}

    def state() -> str:
        return gw.pool("ext")["replicas"][0]["state"]

    with run_gateway(config, tmp_path) as gw:
        with stub_backend("ext", port=port):
            wait_until(lambda: state() == "ready", 30, "the backend to be (re-)admitted")
            assert post(gw, "/v1/completions", body, {}).status_code == 200
        wait_until(lambda: state() == "ejected", 30, "active checks to eject the stopped backend")
        down = post(gw, "/v1/completions", body, {})
        assert down.status_code == 503 and down.json()["error"]["code"] == "upstream_unavailable"
        with stub_backend("ext", port=port):
            wait_until(lambda: state() == "ready", 30, "re-admission once /health passes again")
            assert post(gw, "/v1/completions", body, {}).status_code == 200
        metrics = gw.metrics()
        assert metric_value(metrics, "tokenmill:gateway_replica_ejections_total", model="ext") >= 1
        assert metric_value(metrics, "tokenmill:gateway_replica_readmissions_total", model="ext") >= 1
