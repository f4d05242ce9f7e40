"""A draft model's reduced vocabulary (FR-Spec, EAGLE-3's ``draft_vocab_size``): the draft scores only the N token
ids most frequent in its training text, so each draft token reads N rows of the output head instead of the whole
vocabulary (SmolLM2: 49,152 x 576, ~113 MB of fp32 a token, as much as several of its layers on a CPU).

On disk, beside the draft's weights: ``draft_vocab.json`` holds ``token_ids`` (every id of the vocabulary, most
frequent in the training text first; ties by id) and ``counts`` (their counts), and config.json's
``draft_vocab_size`` says how many of them the draft proposes from by default. JSON, not safetensors: loaders
(tokenmill's included) read every ``*.safetensors`` of a model directory as a weight shard. The whole ranking is
kept so a server can pick another N (``speculative_config``'s ``draft_vocab_size``) without retraining.

Verification stays exact: a greedy draft's argmax over the subset is only a proposal the target checks; a sampled
draft's distribution q is zero outside the subset, which rejection sampling allows (the target's distribution is
still what comes out).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DRAFT_VOCAB_FILE = "draft_vocab.json"
CONFIG_KEY = "draft_vocab_size"


def check_draft_vocab_size(size: int, vocab_size: int, what: str = "--draft-vocab-size") -> None:
    """Raise ValueError unless 1 <= ``size`` <= ``vocab_size``."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"{what} must lie between 1 and the vocabulary size {vocab_size}; got {size}")


def count_token_ids(sequences: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Occurrences [vocab_size] (int64) of each id in ``sequences`` (id tensors of any shape, padding removed)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in sequences:
        counts += torch.bincount(ids.reshape(-1).to(torch.int64), minlength=vocab_size)[:vocab_size]
    return counts


def rank_token_ids(counts: torch.Tensor) -> torch.Tensor:
    """Every id, most frequent first, ties by ascending id (a stable sort: the ranking is deterministic)."""
    return torch.sort(-counts, stable=True).indices


def write_draft_vocab(model_dir: Path, counts: torch.Tensor, size: int) -> Path:
    """Write the ranking of ``counts`` to ``model_dir/draft_vocab.json`` and set config.json's
    ``draft_vocab_size`` to ``size``."""
    check_draft_vocab_size(size, counts.numel())
    ranking = rank_token_ids(counts)
    path = Path(model_dir) / DRAFT_VOCAB_FILE
    path.write_text(json.dumps({"token_ids": ranking.tolist(), "counts": counts[ranking].tolist()}))
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text())
    config[CONFIG_KEY] = size
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_draft_vocab(model_dir: str | Path, vocab_size: int, size: int | None = None) -> torch.Tensor | None:
    """The draft's proposal ids (int64, most frequent first), or None for the whole vocabulary. ``size``: the
    caller's N (None: config.json's ``draft_vocab_size``, or the whole vocabulary when the draft has none); N equal
    to the vocabulary size also means the whole vocabulary."""
    root = Path(model_dir).expanduser()
    path = root / DRAFT_VOCAB_FILE
    if size is None:
        config_path = root / "config.json"
        config = json.loads(config_path.read_text()) if root.is_dir() and config_path.is_file() else {}
        size = config.get(CONFIG_KEY)
        if size is None:
            return None
        if not path.is_file():
            raise ValueError(f"{config_path} sets {CONFIG_KEY} {size} but {path} is missing")
    check_draft_vocab_size(size, vocab_size, f"{CONFIG_KEY}")
    if size == vocab_size:
        return None
    if not path.is_file():
        raise ValueError(f"{CONFIG_KEY} {size} needs the draft's token ranking {path}, which is missing "
                         f"(tokenmill distill --target draft --draft-vocab-size N writes it)")
    ranking = torch.tensor(json.loads(path.read_text())["token_ids"], dtype=torch.int64)
    if ranking.numel() != vocab_size or not torch.equal(ranking.sort().values, torch.arange(vocab_size)):
        raise ValueError(f"{path} is not a ranking of the draft's {vocab_size} token ids")
    return ranking[:size].clone()


class SubsetLMHead(nn.Module):
    """Logits [T, N] over the proposal ids only: the full head's rows for those ids, copied once into one
    contiguous matrix (it then reads N rows a token, not the vocabulary)."""

    def __init__(self, full_weight: torch.Tensor, token_ids: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", full_weight.detach().index_select(0, token_ids.to(full_weight.device)),
                             persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)
