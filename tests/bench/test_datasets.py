"""Workload generators: random lengths within the range ratio, exact prompt lengths with the tiny tokenizer,
shared-prefix structure, ShareGPT filtering and custom JSONL."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from tiny_models import build_tokenizer

from tokenmill.bench import datasets
from tokenmill.bench.tokenizer import count_tokens, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    build_tokenizer(directory)
    return load_tokenizer(str(directory))


def test_random_with_tokenizer_hits_lengths_exactly(tokenizer) -> None:
    reqs = datasets.random_dataset(30, 40, 12, range_ratio=0.5, tokenizer=tokenizer, seed=1)
    assert len(reqs) == 30
    for r in reqs:
        assert r.prompt_len == count_tokens(tokenizer, r.prompt)
        assert 20 <= r.prompt_len <= 60  # 40·[0.5, 1.5]; re-encoding may only shorten
        assert 6 <= r.output_len <= 18
    assert len({r.output_len for r in reqs}) > 1


def test_random_without_tokenizer_counts_words() -> None:
    reqs = datasets.random_dataset(5, 16, 8, tokenizer=None, seed=0)
    assert all(len(r.prompt.split()) == 16 == r.prompt_len and r.output_len == 8 for r in reqs)
    assert reqs == datasets.random_dataset(5, 16, 8, tokenizer=None, seed=0)  # seeded


def test_range_ratio_is_validated() -> None:
    with pytest.raises(ValueError, match="random-range-ratio"):
        datasets.random_dataset(2, 8, 8, range_ratio=1.0)


def test_shared_prefix_has_n_prefixes_times_m_questions(tokenizer) -> None:
    reqs = datasets.shared_prefix_dataset(
        3, 4, prefix_len=30, question_len=5, output_len=7, tokenizer=tokenizer
    )
    assert len(reqs) == 12
    prefixes = Counter(r.prompt.split("\n")[0] for r in reqs)
    assert len(prefixes) == 3 and set(prefixes.values()) == {4}
    assert len({r.prompt for r in reqs}) == 12
    assert all(r.output_len == 7 and r.prompt_len == count_tokens(tokenizer, r.prompt) for r in reqs)


def test_sharegpt_takes_first_turns_and_filters(tmp_path: Path) -> None:
    data = [
        {
            "conversations": [
                {"from": "human", "value": "tell me about the river and the ocean"},
                {"from": "gpt", "value": "the river flows into the ocean every day"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "too short prompt here"},
            ]
        },
        {"conversations": [{"from": "human", "value": "only one turn in this conversation"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = datasets.sharegpt_dataset(path, num=10)
    assert len(reqs) == 1
    assert reqs[0].prompt.startswith("tell me") and reqs[0].prompt_len == 8 and reqs[0].output_len == 8
    assert datasets.sharegpt_dataset(path, num=10, output_len=3)[0].output_len == 3


def test_jsonl_reads_prompts_and_output_lengths(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "a b c", "output_len": 5}\n\n{"prompt": "d e"}\n{"prompt": "f"}\n')
    reqs = datasets.jsonl_dataset(path, num=2, default_output_len=9)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs] == [("a b c", 3, 5), ("d e", 2, 9)]
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 1 must be a JSON object with a string 'prompt'"):
        datasets.jsonl_dataset(path, num=1)


def test_lengths_respect_range_bounds() -> None:
    import numpy as np

    lengths = datasets._lengths(np.random.default_rng(0), 100, 0.3, 5000, "x")
    assert lengths.min() >= 70 and lengths.max() <= math.ceil(130)
    assert abs(lengths.mean() - 100) < 2
