"""Issue 25 (gateway): /health says whether each routed model can serve, with a per-model detail endpoint; a
replica that keeps exiting before it is ready is backed off, then marked failed with its last error visible in
/health, the metrics and the 503 message; requests to a broken pool fail fast naming it; temporary log folders
are removed at exit.
"""

from __future__ import annotations

import httpx
import pytest
from gateway_helpers import STUB_COMMAND, metric_value, run_gateway, wait_until

# Exits like `tokenmill serve --device cuda` on a host without a GPU: a configuration error, status 2.
NO_GPU = ["{python}", "-c", "import sys; print('error: device cuda requested but no CUDA GPU is available'); sys.exit(2)"]
# Crashes at start-up with a transient-looking status 1; prints its pid so each run's output is distinct.
FLAKY = ["{python}", "-c", "import os, sys; print('boom in pid', os.getpid()); sys.exit(1)"]


def _managed(name: str, command: list[str], **extra) -> dict:
    return {"name": name, "kind": "managed", "model": "unused", "command": command, "startup_timeout_s": 60, **extra}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw_health")
    config = {
        "cold_start_timeout_s": 300,  # a request that waited for a broken pool would time the client out
        "health": {"interval_s": 0.5, "timeout_s": 1.0},
        "models": [
            _managed("fast", STUB_COMMAND),
            _managed("broken", NO_GPU),
            _managed("flaky", FLAKY, max_start_failures=3),
            _managed("covered", NO_GPU, fallback="fast"),
        ],
        "aliases": {"cheap": "fast"},
        "virtual_models": [{"name": "auto", "fast": "fast", "strong": "broken", "threshold": 0.0}],
    }
    with run_gateway(config, tmp) as gw:
        wait_until(lambda: gw.pool("fast")["state"] == "ready", 60, "pool fast ready")
        wait_until(lambda: gw.pool("flaky")["state"] == "failed", 60, "pool flaky marked failed")
        yield gw


def test_health_is_503_and_names_the_models_that_cannot_serve(gateway):
    resp = httpx.get(f"{gateway.url}/health", timeout=10)
    assert resp.status_code == 503
    body = resp.json()
    assert body["status"] == "unavailable"
    assert sorted(body["unavailable"]) == ["broken", "flaky"]
    models = body["models"]
    assert models["fast"]["state"] == "ready" and models["fast"]["can_serve"]
    assert models["broken"]["state"] == "failed" and not models["broken"]["can_serve"]
    assert "no CUDA GPU" in models["broken"]["last_error"] and "status 2" in models["broken"]["last_error"]
    # A broken pool whose fallback serves still lets its model serve.
    assert models["covered"]["state"] == "failed" and models["covered"]["can_serve"]


def test_per_model_health_detail(gateway):
    broken = httpx.get(f"{gateway.url}/health/broken", timeout=10)
    assert broken.status_code == 503
    [pool] = broken.json()["pools"]
    assert pool["replicas"][0]["state"] == "failed" and "no CUDA GPU" in pool["replicas"][0]["last_error"]
    assert httpx.get(f"{gateway.url}/health/fast", timeout=10).status_code == 200
    assert httpx.get(f"{gateway.url}/health/cheap", timeout=10).status_code == 200  # alias of fast
    auto = httpx.get(f"{gateway.url}/health/auto", timeout=10)
    assert auto.status_code == 503 and [p["model"] for p in auto.json()["pools"]] == ["fast", "broken"]
    assert httpx.get(f"{gateway.url}/livez", timeout=10).status_code == 200  # the process answers regardless
    missing = httpx.get(f"{gateway.url}/health/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("model", ["broken", "auto"])
def test_request_to_a_failed_pool_fails_fast_naming_it_and_its_error(gateway, model):
    body = {"model": model, "prompt": "a question that needs the strong model", "max_tokens": 2}
    resp = httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=30)  # cold start would wait 300 s
    assert resp.status_code == 503
    error = resp.json()["error"]
    assert error["code"] == "upstream_unavailable"
    assert "'broken'" in error["message"] and "no CUDA GPU" in error["message"]


def test_fallback_still_serves_a_failed_pools_requests(gateway):
    resp = httpx.post(f"{gateway.url}/v1/completions", json={"model": "covered", "prompt": "hi", "max_tokens": 1},
                      timeout=30)  # fmt: skip
    assert resp.status_code == 200 and resp.headers["x-tokenmill-routed-model"] == "fast"


def test_crash_loop_is_backed_off_then_marked_failed(gateway):
    [replica] = gateway.pool("flaky")["replicas"]
    assert replica["state"] == "failed" and replica["start_failures"] == 3 and replica["restarts"] == 2
    assert replica["last_error"].count("boom in pid") == 1  # this run's output only, not every earlier one
    [never_restarted] = gateway.pool("broken")["replicas"]
    assert never_restarted["restarts"] == 0  # exit status 2 is a configuration error: no restart can fix it
    log = gateway.log()
    assert "restarting in 0.5 s" in log and "restarting in 1.0 s" in log  # exponential back-off
    metrics = gateway.metrics()
    assert metric_value(metrics, "tokenmill:gateway_replicas", model="flaky", state="failed") == 1
    assert metric_value(metrics, "tokenmill:gateway_model_serving", model="broken") == 0
    assert metric_value(metrics, "tokenmill:gateway_model_serving", model="fast") == 1
    assert metric_value(metrics, "tokenmill:gateway_replica_failures_total", model="flaky") == 1


def test_health_is_200_when_every_model_can_serve(tmp_path):
    config = {"models": [_managed("fast", STUB_COMMAND), {**_managed("lazy", STUB_COMMAND), "replicas": 0}]}
    with run_gateway(config, tmp_path, wait_healthy=True) as gw:
        body = httpx.get(f"{gw.url}/health", timeout=10).json()
        assert body["status"] == "ok" and body["unavailable"] == []
        assert body["models"]["lazy"]["state"] == "idle"  # scaled to zero: starts a replica on demand


def test_temporary_log_folders_are_removed_at_exit(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    config = {"log_dir": None, "models": [_managed("fast", STUB_COMMAND)]}
    with run_gateway(config, tmp_path, env={"TMPDIR": str(temp)}) as gw:
        wait_until(lambda: gw.pool("fast")["state"] == "ready", 60, "pool fast ready")
        assert [p.name for p in temp.iterdir() if p.name.startswith("tokenmill-gateway-")]
    assert not [p.name for p in temp.iterdir() if p.name.startswith("tokenmill-gateway-")]
