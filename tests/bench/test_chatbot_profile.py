"""``bench serve --profile chatbot``: ShareGPT-like lengths synthesized offline, the chat endpoint, a rate sweep
with the SLO, and an HTML report with latency percentiles against load (against the fake server)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tokenmill.bench.datasets import CHATBOT_LENGTHS, chatbot_dataset, chatbot_lengths
from tokenmill.bench.serve import apply_profile
from tokenmill.cli import build_parser

from .fake_server import running_fake_server
from .helpers import run_bench


def test_chatbot_lengths_follow_the_documented_distribution() -> None:
    pairs = chatbot_lengths(4000, seed=1)
    prompts = np.array([p for p, _ in pairs])
    replies = np.array([r for _, r in pairs])
    c = CHATBOT_LENGTHS
    assert prompts.min() >= c["min_len"] and replies.min() >= c["min_len"]
    assert prompts.max() <= c["max_prompt_len"] and (prompts + replies).max() <= c["max_total_len"]
    # Medians of the lognormals (clipping moves only the tails); heavy right tail: mean well above the median.
    assert abs(np.median(prompts) - c["prompt_median"]) < 0.1 * c["prompt_median"]
    assert abs(np.median(replies) - c["reply_median"]) < 0.1 * c["reply_median"]
    assert prompts.mean() > 1.3 * np.median(prompts) and replies.mean() > 1.15 * np.median(replies)
    assert chatbot_lengths(50, seed=7) == chatbot_lengths(50, seed=7) != chatbot_lengths(50, seed=8)
    with pytest.raises(ValueError, match="num-prompts"):
        chatbot_lengths(0)


def test_chatbot_dataset_without_tokenizer_counts_words() -> None:
    requests = chatbot_dataset(20, None, seed=3)
    assert [(r.prompt_len, r.output_len) for r in requests] == chatbot_lengths(20, seed=3)
    assert all(len(r.prompt.split()) == r.prompt_len for r in requests)


def test_profile_fills_in_only_what_was_not_given() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "serve", "--model", "m", "--profile", "chatbot"])
    apply_profile(args)
    assert (args.dataset, args.endpoint) == ("chatbot", "chat")
    assert args.sweep.startswith("rate=") and args.slo == "ttft=500,tpot=50"
    args = parser.parse_args(["bench", "serve", "--model", "m", "--profile", "chatbot", "--sweep", "rate=3",
                              "--slo", "ttft=100", "--dataset", "sharegpt"])
    apply_profile(args)
    assert (args.sweep, args.slo, args.dataset) == ("rate=3", "ttft=100", "sharegpt")


def test_chatbot_profile_report_shows_percentiles_against_load(tmp_path: Path) -> None:
    with running_fake_server("--tokens-per-chunk", "1", "--token-delay", "0.001") as url:
        doc = run_bench(tmp_path, url, "--model", "fake", "--profile", "chatbot", "--num-prompts", "6",
                        "--sweep", "rate=50,inf", "--extra-body", '{"max_tokens": 4}')
    assert doc["metadata"]["dataset"]["name"] == "chatbot" and doc["metadata"]["target"]["endpoint"] == "chat"
    assert doc["sweep"] == {"param": "rate", "values": [50.0, float("inf")]}
    assert [run["summary"]["num_completed"] for run in doc["runs"]] == [6, 6]
    assert all(run["summary"]["goodput"] is not None for run in doc["runs"])  # the profile's SLO applied
    html = (tmp_path / "run.html").read_text()
    table = html[html.index("Latency percentiles against load"):]
    assert "TTFT p99 ms" in table and "ITL p90 ms" in table and "rate=50" in table and "rate=inf" in table
    assert len(re.findall(r"<img alt=\"Latency percentiles vs load\"", html)) == 1
