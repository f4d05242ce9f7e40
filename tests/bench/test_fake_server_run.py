"""``bench serve`` end to end against the fake OpenAI-compatible server (a subprocess on a free port):
files written, counts consistent, usage preferred over chunk counting, flags reach the server."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from .fake_server import running_fake_server
from .helpers import run_bench

SMALL = ("--model", "fake", "--random-input-len", "12", "--random-output-len", "9")


@pytest.fixture(scope="module")
def multi_token_server():
    # 2 tokens per chunk: chunk counts and usage disagree, so the test shows which one is used.
    with running_fake_server("--tokens-per-chunk", "2", "--token-delay", "0.001") as url:
        yield url


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_run_writes_reports_and_uses_server_usage(
    tmp_path: Path, multi_token_server: str, endpoint: str
) -> None:
    doc = run_bench(
        tmp_path,
        multi_token_server,
        *SMALL,
        "--endpoint",
        endpoint,
        "--num-prompts",
        "12",
        "--max-concurrency",
        "4",
        "--warmup",
        "3",
        "--save-detailed",
        "--slo",
        "ttft=60000",
    )
    run = doc["runs"][0]
    s = run["summary"]
    assert s["num_sent"] == 12 and s["num_completed"] + s["num_failed"] == s["num_sent"]  # warmup excluded
    assert s["num_failed"] == 0 and s["errors"] == {}
    assert s["peak_concurrency"] <= 4
    assert s["good_requests"] == 12
    records = run["requests"]
    assert len(records) == 12
    for r in records:
        assert r["output_tokens_source"] == "usage"
        assert r["output_tokens"] == r["expected_output_tokens"] == 9
        assert len(r["token_times"]) == math.ceil(9 / 2)  # the chat role-only chunk is not a token
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in records)
    meta = doc["metadata"]
    assert meta["target"]["endpoint"] == endpoint and meta["tokenmill_version"] and meta["date"]
    html = (tmp_path / "run.html").read_text()
    assert html.count("<img") >= 4 and "data:image/png;base64," in html
    rows = list(csv.DictReader((tmp_path / "run.csv").open()))
    assert len(rows) == 1 and int(rows[0]["num_completed"]) == 12


def test_chunk_counting_without_usage(tmp_path: Path) -> None:
    with running_fake_server("--tokens-per-chunk", "1", "--no-usage") as url:
        doc = run_bench(tmp_path, url, *SMALL, "--num-prompts", "4", "--save-detailed")
    for r in doc["runs"][0]["requests"]:
        assert r["output_tokens_source"] == "chunks" and r["output_tokens"] == len(r["token_times"]) == 9


def test_ignore_eos_reaches_the_server(tmp_path: Path) -> None:
    with running_fake_server("--eos-after", "3") as url:
        stops_early = run_bench(tmp_path, url, *SMALL, "--num-prompts", "3", name="eos")
        ignores_eos = run_bench(tmp_path, url, *SMALL, "--num-prompts", "3", "--ignore-eos", name="no-eos")
    assert stops_early["runs"][0]["summary"]["total_output_tokens"] == 3 * 3
    assert ignores_eos["runs"][0]["summary"]["total_output_tokens"] == 3 * 9


def test_sweep_runs_every_point_in_one_command(tmp_path: Path, multi_token_server: str) -> None:
    doc = run_bench(
        tmp_path, multi_token_server, *SMALL, "--num-prompts", "8", "--sweep", "concurrency=1,2,4"
    )
    assert doc["sweep"] == {"param": "concurrency", "values": [1.0, 2.0, 4.0]}
    assert [r["label"] for r in doc["runs"]] == ["concurrency=1", "concurrency=2", "concurrency=4"]
    assert [r["summary"]["peak_concurrency"] <= c for r, c in zip(doc["runs"], (1, 2, 4), strict=True)] == [
        True
    ] * 3
    assert all(r["summary"]["num_completed"] == 8 for r in doc["runs"])
    assert "requests" not in doc["runs"][0]  # per-request records only with --save-detailed
    rate_doc = run_bench(
        tmp_path, multi_token_server, *SMALL, "--num-prompts", "4", "--sweep", "rate=50,inf", name="rates"
    )
    assert [r["load"]["request_rate"] for r in rate_doc["runs"]] == [50.0, None]


def test_duration_limit_stops_sending(tmp_path: Path, multi_token_server: str) -> None:
    doc = run_bench(
        tmp_path,
        multi_token_server,
        *SMALL,
        "--num-prompts",
        "200",
        "--request-rate",
        "20",
        "--duration",
        "0.5",
    )
    s = doc["runs"][0]["summary"]
    assert 0 < s["num_sent"] < 200 and s["num_sent"] + s["num_not_sent"] == 200
    assert s["num_completed"] + s["num_failed"] == s["num_sent"]


def test_user_errors_exit_with_a_sentence(tmp_path: Path, multi_token_server: str, capsys) -> None:
    from tokenmill.cli import main

    assert (
        main(["bench", "serve", "--model", "m", "--base-url", multi_token_server, "--sweep", "threads=2"])
        == 2
    )
    assert "--sweep 'threads=2' must look like concurrency=1,4,16" in capsys.readouterr().err


def test_client_processes_share_one_clock_and_cap(tmp_path: Path, multi_token_server: str) -> None:
    from tokenmill.bench.multiproc import split_concurrency

    assert split_concurrency(5, 2) == [3, 2] and split_concurrency(1, 3) == [1, 0, 0]
    assert split_concurrency(None, 2) == [None, None]
    doc = run_bench(
        tmp_path,
        multi_token_server,
        *SMALL,
        "--num-prompts",
        "12",
        "--max-concurrency",
        "4",
        "--client-processes",
        "2",
        "--request-rate",
        "200",
        "--save-detailed",
    )
    s = doc["runs"][0]["summary"]
    assert s["num_completed"] == 12 and s["errors"] == {}
    records = doc["runs"][0]["requests"]
    assert [r["index"] for r in records] == list(range(12))
    assert s["peak_concurrency"] <= 4
    # One time origin for both processes: starts are non-negative and the merged run spans seconds.
    assert min(r["start"] for r in records) >= 0 and s["duration_s"] < 60
    assert doc["metadata"]["target"]["client_processes"] == 2
