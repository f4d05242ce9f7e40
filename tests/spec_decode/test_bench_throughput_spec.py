"""``bench throughput --speculative-config``: the timed run's acceptance lands in the report and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokenmill.cli import main

SPEC = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "adaptive": false}'


def test_throughput_reports_acceptance(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_llama_dir) -> None:
    out = tmp_path / "result.json"
    # Random prompts over the tiny model's 384-token vocabulary repeat tokens, so prompt lookup finds drafts. The
    # outputs are sampled from torch's global generator: seeded here, so the draft count does not hang on the tests
    # run before (with 6 output tokens a request, some orders gave none), and 16 tokens a request make drafts likely.
    torch.manual_seed(0)
    argv = ["bench", "throughput", "--model", str(tiny_llama_dir), "--device", "cpu", "--num-kv-blocks", "64",
            "--warmup-requests", "1", "--num-prompts", "3", "--input-len", "40", "--output-len", "16", "--ignore-eos",
            "--speculative-config", SPEC, "--output-json", str(out)]
    assert main(argv) == 0
    record = json.loads(out.read_text())
    assert record["results"]["output_tokens"] == 48  # exactly output-len each, drafts or not
    spec = record["spec_decode"]
    assert spec["num_drafts"] > 0 and 0 <= spec["num_accepted_tokens"] <= spec["num_draft_tokens"]
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_tokens"] / spec["num_drafts"],
                                                           abs=1e-3)
    assert "speculative decoding: acceptance rate" in capsys.readouterr().out
