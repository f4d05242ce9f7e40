"""Issue 25: SIGTERM with requests that outlive ``--drain-timeout``. Cut streams end with an SSE error event and
no ``[DONE]`` (the openai SDK raises), a waiting non-streamed request gets a 503 ``drain_timeout``, the log says
"drain timeout" and records them as 503 (not 499 "client disconnected"), and the exit status is non-zero.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server_process import ServerProcess, metric_value

from tokenmill.server.lifecycle import EXIT_DRAIN_TIMEOUT

MODEL = "tiny-llama"
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 230, "stream": True, "ignore_eos": True}
WAITING = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True}
# One running sequence, so the later requests provably wait in the queue when SIGTERM arrives.
ARGS = ("--max-model-len", "256", "--served-model-name", MODEL, "--max-num-seqs", "1", "--drain-timeout", "0")


def _wait_for_waiting(server: ServerProcess, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        if metric_value(metrics, "tokenmill:num_requests_waiting") >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"{count} request(s) never showed up as waiting")


def test_sigterm_past_drain_timeout_cuts_with_errors_and_exits_nonzero(tiny_llama_dir, tmp_path):
    # 20 ms per step: the long request provably still runs while the others queue behind it (the tiny model alone
    # generates its 230 tokens in well under a second, faster than the test sends the next two requests).
    server = ServerProcess(tiny_llama_dir, tmp_path / "server.log", *ARGS,
                           env={"TOKENMILL_TEST_STEP_DELAY_S": "0.02"})
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
            with client.stream("POST", "/v1/completions", json=LONG) as running:
                lines = running.iter_lines()
                events = [next(line for line in lines if line.startswith("data: "))]  # it is generating now
                sdk_stream = sdk.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=200, stream=True,
                    extra_body={"ignore_eos": True},
                )
                pending = pool.submit(httpx.post, server.url + "/v1/completions", json=WAITING, timeout=60)
                _wait_for_waiting(server, 2)
                server.terminate()
                events += [line for line in lines if line.startswith("data: ")]
            with pytest.raises(openai.APIError, match="drain timeout"):
                for _ in sdk_stream:
                    pass
            refused = pending.result(timeout=60)
        assert "data: [DONE]" not in events
        last = json.loads(events[-1][len("data: "):])
        assert last["error"]["code"] == "drain_timeout" and last["error"]["type"] == "service_unavailable"
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "drain_timeout"
        assert server.wait(timeout=60) == EXIT_DRAIN_TIMEOUT
        log = server.log()
        assert "drain timeout" in log
        request_lines = [line for line in log.splitlines() if "tokenmill.server.requests" in line and "cmpl-" in line]
        assert len(request_lines) == 3 and all("status=503" in line for line in request_lines), request_lines
        assert "status=499" not in log and "Traceback" not in log
    finally:
        server.stop()
