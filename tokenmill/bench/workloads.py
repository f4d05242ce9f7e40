"""Offline workloads for ``bench throughput``: prompt token ids plus an output length per request.

Fixed lengths, seeded uniform ranges (random token ids), or a ShareGPT file tokenized with the model's tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OfflineRequest:
    prompt_token_ids: list[int]
    output_len: int


def parse_range(text: str, name: str) -> tuple[int, int]:
    """``"a:b"`` → (a, b) with 1 <= a <= b; ``name`` is the flag named in the error."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"{name} must look like LOW:HIGH with positive integers, e.g. 100:1024; got {text!r}")
    low, high = int(parts[0]), int(parts[1])
    if not 1 <= low <= high:
        raise ValueError(f"{name} must satisfy 1 <= LOW <= HIGH; got {low}:{high}")
    return low, high


def random_token_ids(rng: np.random.Generator, num_tokens: int, vocab_size: int) -> list[int]:
    return rng.integers(0, vocab_size, size=num_tokens).tolist()


def fixed_workload(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0) -> list[OfflineRequest]:
    """``num`` prompts of ``input_len`` random token ids, each asking for ``output_len`` tokens."""
    _check_positive(num=num, input_len=input_len, output_len=output_len, vocab_size=vocab_size)
    rng = np.random.default_rng(seed)
    return [OfflineRequest(random_token_ids(rng, input_len, vocab_size), output_len) for _ in range(num)]


def range_workload(
    num: int, input_range: tuple[int, int], output_range: tuple[int, int], vocab_size: int, seed: int = 0
) -> list[OfflineRequest]:
    """Input and output lengths uniform in the inclusive ranges (nano-vllm's benchmark draws 100–1024)."""
    _check_positive(num=num, vocab_size=vocab_size)
    rng = np.random.default_rng(seed)
    input_lens = rng.integers(input_range[0], input_range[1] + 1, size=num)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, size=num)
    return [
        OfflineRequest(random_token_ids(rng, int(n_in), vocab_size), int(n_out))
        for n_in, n_out in zip(input_lens, output_lens, strict=True)
    ]


def sharegpt_workload(
    path: str | Path, num: int, hf_tokenizer: Any, seed: int = 0, output_len: int | None = None,
    max_total_len: int = 2048,
) -> list[OfflineRequest]:
    """First human turn → prompt ids; first reply's token count → output length (or ``output_len``)."""
    from tokenmill.bench.datasets import sharegpt_dataset

    if hf_tokenizer is None:
        raise ValueError("--dataset needs a tokenizer: pass --tokenizer, or a --model that ships one")
    picked = sharegpt_dataset(path, num, tokenizer=hf_tokenizer, output_len=output_len, seed=seed,
                              max_prompt_len=max_total_len - 1, max_total_len=max_total_len)
    requests = []
    for item in picked:
        ids = list(hf_tokenizer.encode(item.prompt, add_special_tokens=False))
        requests.append(OfflineRequest(ids, max(1, item.output_len)))
    return requests


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}")
