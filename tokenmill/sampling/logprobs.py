"""Logprobs of sampled tokens and the top-k alternatives, from log_softmax of the raw model logits.

One device-to-host copy per call; ranks are 1-based (rank 1 = most likely). Used by sampler.py and the runner.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.outputs import Logprob
from tokenmill.transfer import to_device


def _gather(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[list[float]]:
    """Per row [chosen id, its logprob, its rank, k top values, k top ids], copied to the host in one go."""
    token_ids = token_ids.to(torch.long).unsqueeze(1)
    chosen = logprobs.gather(1, token_ids)
    # Competition ranking: tokens tied with the chosen one share its rank.
    ranks = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1
    parts = [token_ids, chosen, ranks]
    if k > 0:
        top_values, top_ids = logprobs.topk(k, dim=-1)
        parts += [top_values, top_ids]
    # float64 holds token ids and ranks exactly (< 2**53), so one tensor carries everything.
    return torch.cat([part.to(torch.float64) for part in parts], dim=1).cpu().tolist()


def _build(packed_row: list[float], k: int, num_logprobs: int) -> dict[int, Logprob]:
    entry = {int(packed_row[0]): Logprob(logprob=packed_row[1], rank=int(packed_row[2]))}
    values, ids = packed_row[3 : 3 + k], packed_row[3 + k : 3 + 2 * k]
    for position in range(num_logprobs):
        token_id = int(ids[position])
        if token_id not in entry:
            entry[token_id] = Logprob(logprob=values[position], rank=position + 1)
    return entry


def sample_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: Sequence[int | None]
) -> list[dict[int, Logprob] | None]:
    """Per row: None when num_logprobs[i] is None, else {sampled id: Logprob, plus the top num_logprobs[i]}."""
    index = [i for i, k in enumerate(num_logprobs) if k is not None]
    result: list[dict[int, Logprob] | None] = [None] * len(num_logprobs)
    if not index:
        return result
    whole_batch = len(index) == len(num_logprobs)
    index_t = None if whole_batch else to_device(index, torch.long, raw_logits.device)
    logits = raw_logits if index_t is None else raw_logits[index_t]
    chosen = token_ids if index_t is None else token_ids[index_t]
    k = min(max(num_logprobs[i] for i in index), raw_logits.shape[1])
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    packed = _gather(logprobs, chosen, k)
    for j, i in enumerate(index):
        result[i] = _build(packed[j], k, min(num_logprobs[i], k))
    return result


def prompt_logprobs(
    logits: torch.Tensor, next_token_ids: torch.Tensor, num_logprobs: int
) -> list[dict[int, Logprob]]:
    """Prompt logprobs: logits[t] scored against next_token_ids[t] (the prompt token at t + 1), plus top-k."""
    k = min(num_logprobs, logits.shape[1])
    logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return [_build(row, k, k) for row in _gather(logprobs, next_token_ids, k)]
