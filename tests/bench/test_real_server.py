"""Acceptance 2: ``bench serve`` against a real ``tokenmill serve`` subprocess on the tiny Llama (loopback)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .helpers import run_bench


@pytest.fixture(scope="module")
def tokenmill_server(shared_server) -> str:
    """The session's ``python -m tokenmill serve`` on the tiny Llama (tests/conftest.py): its base URL."""
    return shared_server.url


def test_bounded_run_against_tokenmill(tmp_path: Path, tokenmill_server: str, tiny_llama_dir: Path) -> None:
    doc = run_bench(
        tmp_path,
        tokenmill_server,
        "--model",
        "tiny-llama",
        "--tokenizer",
        str(tiny_llama_dir),
        "--num-prompts",
        "50",
        "--max-concurrency",
        "8",
        "--random-input-len",
        "24",
        "--random-output-len",
        "8",
        "--random-range-ratio",
        "0.5",
        "--ignore-eos",
        "--warmup",
        "2",
        "--timeout",
        "120",
        "--save-detailed",
        "--slo",
        "ttft=60000,tpot=60000",
    )
    s = doc["runs"][0]["summary"]
    assert s["num_sent"] == 50 and s["num_completed"] + s["num_failed"] == s["num_sent"]
    assert s["num_failed"] == 0, s["errors"]
    records = doc["runs"][0]["requests"]
    # Output tokens are the server's usage counts, and with ignore_eos exactly what was asked for.
    assert all(r["output_tokens_source"] == "usage" for r in records)
    assert all(r["output_tokens"] == r["expected_output_tokens"] for r in records)
    assert s["total_output_tokens"] == sum(r["expected_output_tokens"] for r in records)
    assert s["ttft_ms"]["count"] == 50 and s["tpot_ms"]["count"] > 0
    assert 1 <= s["peak_concurrency"] <= 8
    html = (tmp_path / "run.html").read_text()
    assert html.count("<img") >= 4 and "data:image/png;base64," in html
    (row,) = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert int(row["num_sent"]) == 50 and int(row["total_output_tokens"]) == s["total_output_tokens"]


def test_chat_endpoint_against_tokenmill(tmp_path: Path, tokenmill_server: str) -> None:
    doc = run_bench(
        tmp_path,
        tokenmill_server,
        "--model",
        "tiny-llama",
        "--endpoint",
        "chat",
        "--num-prompts",
        "6",
        "--random-input-len",
        "10",
        "--random-output-len",
        "5",
        "--ignore-eos",
        "--save-detailed",
    )
    s = doc["runs"][0]["summary"]
    assert s["num_completed"] == 6, s["errors"]
    assert s["total_output_tokens"] == 30
    # The server counts the chat template's tokens; word counts would be smaller.
    assert all(r["prompt_tokens"] > 10 for r in doc["runs"][0]["requests"])
