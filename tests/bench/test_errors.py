"""A misbehaving server (HTTP 500 and 429, connections dropped mid-stream, hangs past the timeout) and a
closed port: every failure is counted by kind and the run completes."""

from __future__ import annotations

from pathlib import Path

from .fake_server import running_fake_server
from .helpers import closed_port, run_bench


def test_errors_are_counted_by_kind(tmp_path: Path) -> None:
    # The server cycles ok, 500, 429, drop, hang per request: 20 requests → 4 of each.
    with running_fake_server("--mode", "mixed", "--hang", "20", "--token-delay", "0.001") as url:
        doc = run_bench(
            tmp_path,
            url,
            "--model",
            "fake",
            "--num-prompts",
            "20",
            "--timeout",
            "1",
            "--random-output-len",
            "6",
            "--save-detailed",
            "--slo",
            "e2e=60000",
        )
    s = doc["runs"][0]["summary"]
    assert s["num_sent"] == 20 and s["num_completed"] + s["num_failed"] == 20
    assert s["errors"] == {"disconnect": 4, "http_429": 4, "http_500": 4, "timeout": 4}
    assert s["num_completed"] == 4 and s["good_requests"] == 4
    assert s["total_output_tokens"] == 4 * 6
    details = {r["error"]: r["error_detail"] for r in doc["runs"][0]["requests"] if r["error"]}
    assert "injected failure" in details["http_500"]
    html = (tmp_path / "run.html").read_text()
    assert "timeout=4" in html


def test_unreachable_server_counts_connect_errors(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    doc = run_bench(tmp_path, url, "--model", "x", "--num-prompts", "5", "--timeout", "5")
    s = doc["runs"][0]["summary"]
    assert s["errors"] == {"connect": 5} and s["num_completed"] == 0
    assert s["ttft_ms"]["mean"] is None
