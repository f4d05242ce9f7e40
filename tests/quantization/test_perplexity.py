"""``tokenmill eval perplexity``: windows score every token once, and the number equals transformers' on the
same model, text and windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tokenmill.cli import main
from tokenmill.quantization.perplexity import PerplexityConfig, evaluate_perplexity, window_spans


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (9, 4, 4), (3, 8, 4), (100, 32, 7)])
def test_windows_score_each_token_once_with_context(n, window, stride):
    spans = window_spans(n, window, stride)
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, n))
    for begin, end, first in spans[1:]:
        assert end - begin <= window and first - begin >= window - stride


def test_perplexity_equals_transformers_on_the_same_windows(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 6)
    config = PerplexityConfig(model=str(tiny_llama), data=str(text), window=32, stride=16)
    ours = evaluate_perplexity(config)
    ids = AutoTokenizer.from_pretrained(str(tiny_llama))(text.read_text(), add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_spans(len(ids), 32, 16):
            logits = model(torch.tensor([ids[begin:end]])).logits[0]
            nll += F.cross_entropy(logits[first - 1 - begin : end - 1 - begin], torch.tensor(ids[first:end]),
                                   reduction="sum").item()
            count += end - first
    assert ours["num_tokens"] == count == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_eval_cli_writes_json(tiny_llama, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(tiny_llama), "--max-tokens", "64", "--window", "32", "--stride", "16",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_tokens"] == 63 and result["perplexity"] > 1.0
    assert "perplexity" in capsys.readouterr().out
