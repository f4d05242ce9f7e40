"""Benchmark workloads: random lengths, ShareGPT-like chatbot lengths (synthetic), ShareGPT JSON, shared-prefix
(N prefixes × M questions), custom JSONL.

Each yields ``BenchRequest`` items; prompt lengths are exact with a tokenizer, else word counts that the
server's reported usage later replaces.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.bench.tokenizer import count_tokens

# Used when no tokenizer is available; one word is roughly one to two tokens for most BPE vocabularies.
_WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point "
    "government company number group problem fact river mountain ocean cloud engine token batch cache "
    "kernel memory window paper garden window letter silver orange purple market bridge station"
).split()


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens when counted with the tokenizer, else words
    output_len: int


def _lengths(rng: np.random.Generator, mean: int, range_ratio: float, num: int, name: str) -> np.ndarray:
    if mean < 1:
        raise ValueError(f"{name} ({mean}) must be >= 1 token")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio ({range_ratio}) must be in [0, 1)")
    low = max(1, math.floor(mean * (1 - range_ratio)))
    high = max(low, math.ceil(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num)


def sampling_vocab(tokenizer: Any | None) -> np.ndarray | None:
    """The ids random prompts draw from (all but special tokens); built once per dataset (a 128k-id scan)."""
    if tokenizer is None:
        return None
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


def random_text(
    num_tokens: int, rng: np.random.Generator, tokenizer: Any | None, vocab: np.ndarray | None = None
) -> tuple[str, int]:
    """Text of about ``num_tokens`` tokens and its length (exact with a tokenizer, else in words)."""
    if tokenizer is None:
        return " ".join(rng.choice(_WORDS, size=num_tokens)), num_tokens
    if vocab is None:
        vocab = sampling_vocab(tokenizer)
    ids = rng.choice(vocab, size=num_tokens).tolist()
    # Decoding then re-encoding can merge or split tokens; trim on the re-encoded ids to hit the length.
    text = tokenizer.decode(ids)
    for _ in range(3):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) <= num_tokens:
            break
        text = tokenizer.decode(encoded[:num_tokens])
    return text, count_tokens(tokenizer, text) or num_tokens


def random_dataset(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    tokenizer: Any | None = None,
    seed: int = 0,
) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    input_lens = _lengths(rng, input_len, range_ratio, num, "--random-input-len")
    output_lens = _lengths(rng, output_len, range_ratio, num, "--random-output-len")
    requests = []
    vocab = sampling_vocab(tokenizer)
    for n_in, n_out in zip(input_lens, output_lens, strict=True):
        text, length = random_text(int(n_in), rng, tokenizer, vocab)
        requests.append(BenchRequest(text, length, int(n_out)))
    return requests


# The chatbot profile's lengths: a ShareGPT-like shape synthesized offline (no file to fetch). Lognormal, as
# chat prompt and reply lengths are heavy-tailed: most turns are short, a few are long. Medians and spreads are
# our choice, made so the means land near the ~200-token prompts and replies commonly reported for ShareGPT's
# first turns under vLLM's filters (prompt <= 1024, prompt + reply <= 2048, both >= 4). Before the caps:
#   prompt: median 128, sigma 1.0 -> mean 128 * e^0.5 ~ 211;  reply: median 160, sigma 0.8 -> mean 160 * e^0.32 ~ 220.
CHATBOT_LENGTHS = {"prompt_median": 128, "prompt_sigma": 1.0, "reply_median": 160, "reply_sigma": 0.8,
                   "min_len": 4, "max_prompt_len": 1024, "max_total_len": 2048}


def chatbot_lengths(num: int, seed: int = 0, max_total_len: int = 2048) -> list[tuple[int, int]]:
    """``num`` (prompt length, reply length) pairs drawn from CHATBOT_LENGTHS, clipped to its caps."""
    if num < 1:
        raise ValueError(f"--num-prompts ({num}) must be >= 1")
    c = CHATBOT_LENGTHS
    max_total_len = min(max_total_len, c["max_total_len"])
    if max_total_len < 2 * c["min_len"]:
        raise ValueError(f"the chatbot profile needs a total length of >= {2 * c['min_len']} tokens")
    rng = np.random.default_rng(seed)
    prompts = rng.lognormal(math.log(c["prompt_median"]), c["prompt_sigma"], size=num)
    replies = rng.lognormal(math.log(c["reply_median"]), c["reply_sigma"], size=num)
    pairs = []
    for p, r in zip(prompts, replies, strict=True):
        n_in = int(min(max(round(p), c["min_len"]), c["max_prompt_len"], max_total_len - c["min_len"]))
        n_out = int(min(max(round(r), c["min_len"]), max_total_len - n_in))
        pairs.append((n_in, n_out))
    return pairs


def chatbot_dataset(num: int, tokenizer: Any | None = None, seed: int = 0) -> list[BenchRequest]:
    """Random-text prompts with ShareGPT-like prompt and reply lengths (CHATBOT_LENGTHS)."""
    rng = np.random.default_rng(seed + 1)
    vocab = sampling_vocab(tokenizer)
    requests = []
    for n_in, n_out in chatbot_lengths(num, seed):
        text, length = random_text(n_in, rng, tokenizer, vocab)
        requests.append(BenchRequest(text, length, n_out))
    return requests


def shared_prefix_dataset(
    num_prefixes: int,
    questions_per_prefix: int,
    prefix_len: int,
    question_len: int,
    output_len: int,
    tokenizer: Any | None = None,
    seed: int = 0,
) -> list[BenchRequest]:
    """``num_prefixes`` long prefixes, each followed by ``questions_per_prefix`` distinct questions, shuffled."""
    if num_prefixes < 1 or questions_per_prefix < 1:
        raise ValueError(
            f"shared-prefix needs >= 1 prefix and >= 1 question per prefix (got {num_prefixes} × {questions_per_prefix})"
        )
    rng = np.random.default_rng(seed)
    requests = []
    vocab = sampling_vocab(tokenizer)
    for _ in range(num_prefixes):
        prefix, n_prefix = random_text(prefix_len, rng, tokenizer, vocab)
        for _ in range(questions_per_prefix):
            question, _ = random_text(question_len, rng, tokenizer, vocab)
            prompt = f"{prefix}\n{question}"
            length = count_tokens(tokenizer, prompt) or n_prefix + question_len
            requests.append(BenchRequest(prompt, length, output_len))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def _length_of(text: str, tokenizer: Any | None) -> int:
    counted = count_tokens(tokenizer, text)
    return counted if counted is not None else len(text.split())


def sharegpt_dataset(
    path: str | Path,
    num: int,
    tokenizer: Any | None = None,
    output_len: int | None = None,
    seed: int = 0,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
) -> list[BenchRequest]:
    """First human turn as prompt, the reply's length as output length (or ``output_len``); like vLLM,
    pairs under 4 tokens or over the length caps are skipped."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"ShareGPT file {path} must hold a JSON list of conversations")
    rng = np.random.default_rng(seed)
    requests: list[BenchRequest] = []
    for i in rng.permutation(len(data)):
        turns = data[int(i)].get("conversations") or data[int(i)].get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        prompt_len = _length_of(prompt, tokenizer)
        reply_len = output_len if output_len is not None else _length_of(reply, tokenizer)
        if prompt_len < 4 or reply_len < 4 and output_len is None:
            continue
        if prompt_len > max_prompt_len or prompt_len + reply_len > max_total_len:
            continue
        requests.append(BenchRequest(prompt, prompt_len, reply_len))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(
            f"ShareGPT file {path} has no usable conversation (need a prompt and a reply of >= 4 tokens)"
        )
    return requests


def jsonl_dataset(
    path: str | Path, num: int, tokenizer: Any | None = None, default_output_len: int = 128
) -> list[BenchRequest]:
    """One JSON object per line: ``{"prompt": str, "output_len": int (optional)}``; first ``num`` lines."""
    requests = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path} line {line_no} must be a JSON object with a string 'prompt'")
        out_len = int(item.get("output_len", item.get("max_tokens", default_output_len)))
        if out_len < 1:
            raise ValueError(f"{path} line {line_no}: output_len ({out_len}) must be >= 1")
        requests.append(BenchRequest(item["prompt"], _length_of(item["prompt"], tokenizer), out_len))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(f"{path} holds no request lines")
    return requests
