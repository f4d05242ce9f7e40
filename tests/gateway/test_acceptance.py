"""Issue 6 acceptance with real `tokenmill serve` replicas (tiny models, CPU) managed by a real gateway process:
routing by name and `auto` (header + backend metrics), the openai SDK incl. streaming, SIGKILL of a replica under
200 requests, and autoscaling up to max, down to zero, and a cold start.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import threading

import httpx
import openai
import pytest
from gateway_helpers import metric_value, run_gateway, wait_ready, wait_until

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tokenmill.server.cli") is None,
    reason="tokenmill.server.cli (the `tokenmill serve` model server) is not built yet",
)

# Small KV cache and batch: the replicas start faster and the test stays light on two busy cores. The engine runs in
# the replica's own process (--no-engine-process): one Python process importing torch instead of two, so each of
# the ~8 replica starts here is ~6 s shorter; the gateway sees the same server, and tests/server covers the
# engine-core process (the shared server runs it).
REPLICA_ARGS = ["--device", "cpu", "--num-kv-blocks", "64", "--max-num-seqs", "16", "--drain-timeout", "5",
                "--no-engine-process"]
STARTUP_S = 240
HARD_PROMPT = "Prove step by step that this algorithm terminates, then analyze its complexity."


def managed(name: str, model_dir, replicas: int, **extra) -> dict:
    return {"name": name, "kind": "managed", "model": str(model_dir), "replicas": replicas,
            "args": REPLICA_ARGS, "startup_timeout_s": STARTUP_S, "drain_timeout_s": 5, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_model_dirs):
    config = {
        "health": {"interval_s": 1.0, "timeout_s": 2.0, "failure_threshold": 2},
        "models": [
            managed("fast", tiny_model_dirs["llama"], 2),
            managed("strong", tiny_model_dirs["qwen2"], 1),
        ],
        "virtual_models": [{"name": "auto", "fast": "fast", "strong": "strong", "threshold": 0.5}],
    }
    with run_gateway(config, tmp_path_factory.mktemp("gw_real")) as gw:
        wait_ready(gw, "fast", 2, STARTUP_S)
        wait_ready(gw, "strong", 1, STARTUP_S)
        yield gw


def backend_successes(url: str) -> float:
    return metric_value(httpx.get(f"{url}/metrics", timeout=5).text, "tokenmill:request_success_total")


def test_model_and_auto_routing_with_the_openai_sdk(gateway):
    fast_urls = [r["url"] for r in gateway.ready_replicas("fast")]
    strong_url = gateway.ready_replicas("strong")[0]["url"]
    fast_before = sum(backend_successes(u) for u in fast_urls)
    strong_before = backend_successes(strong_url)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)

    by_name = client.completions.with_raw_response.create(model="strong", prompt="hello", max_tokens=4)
    assert by_name.headers["x-tokenmill-routed-model"] == "strong"
    assert by_name.parse().usage.completion_tokens == 4
    simple = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert simple.headers["x-tokenmill-routed-model"] == "fast"
    assert simple.headers["x-tokenmill-route-reason"] == "auto:fast"
    hard = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": HARD_PROMPT}], max_tokens=4
    )
    assert hard.headers["x-tokenmill-routed-model"] == "strong"
    assert hard.parse().choices[0].message.role == "assistant"

    # Streaming through the gateway: the same greedy text as the non-streamed answer, chunk by chunk.
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 3 and chunks[-1].usage.completion_tokens == 4
    assert streamed == simple.parse().choices[0].message.content

    # Each backend's own metrics saw exactly the requests the policy sent it (2 fast, 2 strong).
    wait_until(lambda: backend_successes(strong_url) - strong_before == 2, 10, "strong backend count")
    wait_until(
        lambda: sum(backend_successes(u) for u in fast_urls) - fast_before == 2, 10, "fast backend count"
    )
    metrics = gateway.metrics()
    assert metric_value(metrics, "tokenmill:gateway_routed_requests_total", requested_model="auto",
                        routed_model="strong", reason="auto:strong") == 1  # fmt: skip
    assert metric_value(metrics, "tokenmill:gateway_routed_requests_total", requested_model="auto",
                        routed_model="fast", reason="auto:fast") == 2  # fmt: skip
    models = {m.id for m in client.models.list()}
    assert models == {"fast", "strong", "auto"}


def test_sigkill_of_a_replica_during_200_requests(gateway):
    replicas = wait_ready(gateway, "fast", 2, STARTUP_S)
    victim = replicas[0]
    before = gateway.metrics()
    client = httpx.Client(base_url=gateway.url, timeout=120)
    body = {"model": "fast", "prompt": "The quick brown fox", "max_tokens": 4}
    done = threading.Semaphore(0)

    def one(_: int) -> int:
        try:
            return client.post("/v1/completions", json=body).status_code
        finally:
            done.release()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        for _ in range(40):  # kill mid-load, with requests in flight on both replicas
            done.acquire()
        os.kill(victim["pid"], signal.SIGKILL)
        statuses = [f.result() for f in futures]
    client.close()
    assert statuses.count(200) == 200, {s: statuses.count(s) for s in set(statuses)}

    def restarted() -> bool:
        now = {r["slot"]: r for r in gateway.ready_replicas("fast")}
        back = now.get(victim["slot"])
        return back is not None and back["pid"] != victim["pid"] and back["restarts"] >= 1

    wait_until(restarted, STARTUP_S, "the killed replica to be restarted and ready")
    after = gateway.metrics()

    def grew(name: str) -> float:
        return metric_value(after, name, model="fast") - metric_value(before, name, model="fast")

    assert grew("tokenmill:gateway_replica_ejections_total") >= 1
    assert grew("tokenmill:gateway_replica_restarts_total") >= 1
    assert grew("tokenmill:gateway_retries_total") >= 1
    assert "exited with -9; restarting" in gateway.log()
    assert httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=60).status_code == 200


def test_dashboard_and_scaler_metrics_exist_on_real_processes(gateway):
    """Every tokenmill: metric the Grafana dashboard, KEDA and HPA query is exported by a server or the gateway."""
    from deploy_checks import exported_metric_names, queried_metric_names

    replica = gateway.ready_replicas("fast")[0]["url"]
    exported = exported_metric_names(httpx.get(f"{replica}/metrics").text)
    exported |= exported_metric_names(gateway.metrics())
    missing = sorted(queried_metric_names() - exported)
    assert not missing, f"queried but not exported: {missing}"


def test_autoscaling_to_max_then_zero_then_cold_start(tmp_path, tiny_llama_dir):
    autoscale = {"min_replicas": 0, "max_replicas": 2, "target_load_per_replica": 1, "interval_s": 0.5,
                 "scale_up_cooldown_s": 1, "scale_down_cooldown_s": 3, "idle_timeout_s": 2}  # fmt: skip
    # Start at zero: the first requests queue at the gateway (cold start), and that queue alone asks for max.
    config = {"models": [managed("elastic", tiny_llama_dir, 0, autoscale=autoscale)]}
    with run_gateway(config, tmp_path) as gw:
        assert gw.pool("elastic")["replicas"] == []
        stop = threading.Event()
        statuses: list[int] = []
        body = {"model": "elastic", "prompt": "Once upon a time", "max_tokens": 48, "ignore_eos": True}

        def client_loop() -> None:
            with httpx.Client(base_url=gw.url, timeout=STARTUP_S) as client:
                while not stop.is_set():
                    statuses.append(client.post("/v1/completions", json=body).status_code)

        with concurrent.futures.ThreadPoolExecutor(6) as workers:
            for _ in range(6):
                workers.submit(client_loop)
            try:
                wait_until(lambda: len(gw.ready_replicas("elastic")) == 2, STARTUP_S, "scale-up to max")
            finally:
                stop.set()
        assert statuses and set(statuses) == {200}

        wait_until(lambda: gw.pool("elastic")["replicas"] == [], 60, "scale to zero after idle")
        cold = httpx.post(f"{gw.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=STARTUP_S)
        assert cold.status_code == 200, cold.text
        assert cold.json()["usage"]["completion_tokens"] == 2
        metrics = gw.metrics()
        scale = "tokenmill:gateway_scale_events_total"
        assert metric_value(metrics, scale, model="elastic", direction="up", reason="load") >= 1
        assert metric_value(metrics, scale, model="elastic", direction="down", reason="idle") >= 1
        assert metric_value(metrics, scale, model="elastic", direction="up", reason="cold_start") == 2
        log = gw.log()
        assert "scaling up from 0 to 1 replicas (cold_start)" in log
        assert "scaling up from 1 to 2 replicas (load)" in log and "to 0 replicas (idle)" in log


def test_replica_killed_mid_stream_is_resumed_on_the_other_replica(gateway):
    wait_ready(gateway, "fast", 2, STARTUP_S)
    before = gateway.metrics()
    body = {
        "model": "fast",
        "prompt": "Once upon a time",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    pids = {r["slot"]: r["pid"] for r in gateway.ready_replicas("fast")}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        # Freeze the serving replica at once: on busy cores it could otherwise finish all 400 tokens before the
        # kill, leaving nothing to resume. Stopped, it holds its connection open until SIGKILL breaks it.
        pid = pids[resp.headers["x-tokenmill-replica"]]
        os.kill(pid, signal.SIGSTOP)
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["index"] == 0
        os.kill(pid, signal.SIGKILL)
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest and rest[-1] == "[DONE]", rest[-3:]  # finished, by the replica that took over
    chunks = [json.loads(first[6:])] + [json.loads(event) for event in rest[:-1]]
    assert not any("error" in chunk for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    after = gateway.metrics()
    resumed = metric_value(after, "tokenmill:gateway_stream_resumes_total", model="fast", outcome="resumed")
    assert resumed - metric_value(before, "tokenmill:gateway_stream_resumes_total", model="fast",
                                  outcome="resumed") == 1  # fmt: skip
