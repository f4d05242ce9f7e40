"""``bench-model --search`` against a live server: candidates measured, the best written and loaded, or the
original configuration restored when no candidate meets the latency budget. Bounded: 0.4 s per level, loopback."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import yaml

from tokenmill.cli import main
from tokenmill.modelserver.loadgen import ServerProcess


@pytest.fixture(scope="module")
def live(exported, tmp_path_factory):
    """A one-model repository (the exported sentiment graph) and a server over it."""
    repo = tmp_path_factory.mktemp("search_repository")
    src = exported["repository"] / "sentiment"
    (repo / "sentiment" / "1").mkdir(parents=True)
    (repo / "sentiment" / "1" / "model.onnx").symlink_to((src / "1" / "model.onnx").resolve())
    shutil.copy(src / "config.yaml", repo / "sentiment" / "config.yaml")
    server = ServerProcess(repo, device="cpu")
    yield repo, server.url
    server.close()


def search_argv(repo, url, tmp_path, budget_ms: float, max_batch_sizes: str = "4,8") -> list[str]:
    return ["bench-model", "--search", "--model", "sentiment", "--repository", str(repo), "--url", url,
            "--latency-budget-ms", str(budget_ms), "--search-max-batch-sizes", max_batch_sizes,
            "--search-queue-delays-ms", "0",
            "--search-instance-counts", "1", "--concurrency", "1,4", "--seconds", "0.4",
            "--output", str(tmp_path / "search.json"), "--plot", str(tmp_path / "search.png")]


def test_search_writes_the_best_candidate_and_the_server_serves_it(live, tmp_path):
    repo, url = live
    assert main(search_argv(repo, url, tmp_path, budget_ms=60_000)) == 0
    summary = json.loads((tmp_path / "search.json").read_text())
    measured = [c for c in summary["candidates"] if c["levels"]]
    assert len(measured) == 2 and all(lv["failed"] == 0 and lv["requests"] > 0 for c in measured for lv in c["levels"])
    best = summary["best"]
    assert best["p99_ms"] <= 60_000
    top = max(lv["throughput_rps"] for c in measured for lv in c["levels"])
    assert best["throughput_rps"] == top
    config = yaml.safe_load((repo / "sentiment" / "config.yaml").read_text())
    assert config["max_batch_size"] == best["candidate"]["max_batch_size"]
    assert config["dynamic_batching"]["max_queue_delay_ms"] == 0
    served = httpx.get(f"{url}/v2/models/sentiment/config").json()
    assert served["max_batch_size"] == best["candidate"]["max_batch_size"]
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reply = httpx.post(f"{url}/v1/sentiment/sentiment", json={"text": "I loved it."})
    assert reply.status_code == 200


def test_an_unmeetable_budget_restores_the_original_configuration(live, tmp_path, capsys):
    repo, url = live
    before = (repo / "sentiment" / "config.yaml").read_text()
    # One candidate that differs from the configuration in place (max batch 2: the export wrote 32, the test above
    # 4 or 8) changes what the failed search must restore; each candidate costs a warm-up and a level of load (~6 s).
    assert yaml.safe_load(before)["max_batch_size"] != 2
    assert main(search_argv(repo, url, tmp_path, budget_ms=0.001, max_batch_sizes="2")) == 1
    assert yaml.safe_load((repo / "sentiment" / "config.yaml").read_text()) == yaml.safe_load(before)
    assert "lowest p99 seen" in capsys.readouterr().out
    assert json.loads((tmp_path / "search.json").read_text())["best"] is None


def test_bad_search_arguments_fail_before_any_load(tmp_path, capsys):
    assert main(["bench-model", "--search", "--model", "sentiment", "--repository", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
