"""Logits processors that look at a sequence's history: min_tokens, repetition, presence and frequency penalties.

Batched over rows with one scatter_add of packed token ids; used by sampler.py before temperature and filters.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenmill.sampling.sampler import SamplingRow


def token_counts(sequences: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(sequences), vocab_size] float counts of each token id per sequence, by one scatter_add.

    The ids are packed flat (row * vocab_size + id) rather than padded: an int64 array buffer turns Python
    lists into a tensor several times faster than torch.tensor on nested lists, and no pad column is needed.
    """
    counts = torch.zeros(len(sequences), vocab_size, dtype=torch.float32, device=device)
    lengths = [len(seq) for seq in sequences]
    total = sum(lengths)
    if total == 0:
        return counts
    flat = array("q")
    for seq in sequences:
        flat.extend(seq)
    token_ids = torch.frombuffer(flat, dtype=torch.int64).to(device)
    row_ids = torch.repeat_interleave(
        torch.arange(len(sequences), device=device),
        torch.tensor(lengths, device=device),
        output_size=total,  # known here, so CUDA need not sync to size the result
    )
    counts.view(-1).scatter_add_(0, row_ids * vocab_size + token_ids, torch.ones(total, device=device))
    return counts


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow], eos_token_ids: set[int]) -> None:
    """In place: forbid EOS and stop_token_ids for rows that have not yet produced min_tokens tokens."""
    vocab_size = logits.shape[1]
    row_index: list[int] = []
    token_index: list[int] = []
    for i, row in enumerate(rows):
        if len(row.output_token_ids) >= row.params.min_tokens:
            continue
        # EOS is blocked even with ignore_eos: min_tokens is a floor on length whatever stops the sequence.
        for token_id in eos_token_ids.union(row.params.stop_token_ids):
            if token_id < vocab_size:
                row_index.append(i)
                token_index.append(token_id)
    if row_index:
        rows_t = torch.tensor(row_index, dtype=torch.long, device=logits.device)
        tokens_t = torch.tensor(token_index, dtype=torch.long, device=logits.device)
        logits[rows_t, tokens_t] = float("-inf")


def _needs_penalties(row: SamplingRow) -> bool:
    p = row.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def needs_history(rows: Sequence[SamplingRow]) -> bool:
    """Whether any row needs min_tokens masking or a penalty this step (else both processors are no-ops)."""
    return any(len(row.output_token_ids) < row.params.min_tokens or _needs_penalties(row) for row in rows)


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """In place: repetition penalty (HF: over prompt + output, logit > 0 → /p else *p), then presence and
    frequency penalties (OpenAI: over output only, logit -= presence * [count > 0] + frequency * count)."""
    index = [i for i, row in enumerate(rows) if _needs_penalties(row)]
    if not index:
        return
    selected = [rows[i] for i in index]
    whole_batch = len(index) == len(rows)
    device = logits.device
    vocab_size = logits.shape[1]
    index_t = None if whole_batch else torch.tensor(index, dtype=torch.long, device=device)
    sub = logits if index_t is None else logits[index_t]

    output_counts = token_counts([row.output_token_ids for row in selected], vocab_size, device)
    repetition = [row.params.repetition_penalty for row in selected]
    if any(r != 1.0 for r in repetition):
        prompt_counts = token_counts([row.prompt_token_ids for row in selected], vocab_size, device)
        seen = (prompt_counts + output_counts) > 0
        penalty = torch.tensor(repetition, dtype=sub.dtype, device=device).unsqueeze(1)
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalized, sub)

    presence = [row.params.presence_penalty for row in selected]
    frequency = [row.params.frequency_penalty for row in selected]
    if any(presence) or any(frequency):
        presence_t = torch.tensor(presence, dtype=sub.dtype, device=device).unsqueeze(1)
        frequency_t = torch.tensor(frequency, dtype=sub.dtype, device=device).unsqueeze(1)
        sub = sub - presence_t * (output_counts > 0).to(sub.dtype) - frequency_t * output_counts

    if index_t is None:
        logits.copy_(sub)
    else:
        logits[index_t] = sub
