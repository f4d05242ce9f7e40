"""Distribution filters applied after temperature: top-k and top-p (one sort for the rows that use them), min-p.

Each masks dropped tokens to -inf in place; rows whose knobs are off pass through untouched. Used by sampler.py.
"""

from __future__ import annotations

import torch

from tokenmill.transfer import to_device

# Rows whose top_k is at most this take a partial topk instead of a full sort of the vocabulary.
PARTIAL_SORT_MAX_K = 1024
# Slack on the top-p cut so a prefix whose mass equals top_p up to float rounding counts as reaching it.
_TOP_P_TOLERANCE = 1e-6


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """In place over [N, V] logits: keep each row's k most likely tokens (top_k <= 0: all), then the smallest
    prefix of the rest, by descending probability, whose probability mass is >= top_p (1.0: all)."""
    vocab_size = logits.shape[1]
    ks = [k if 0 < k < vocab_size else vocab_size for k in top_k]
    index = [i for i, (k, p) in enumerate(zip(ks, top_p, strict=True)) if k < vocab_size or p < 1.0]
    if not index:
        return  # no row filters: skip the sort entirely
    device = logits.device
    whole_batch = len(index) == logits.shape[0]
    index_t = None if whole_batch else to_device(index, torch.long, device)
    sub = logits if index_t is None else logits[index_t]

    max_k = max(ks[i] for i in index)
    # When every filtering row has a small top_k, top-p only ever looks inside it: a partial topk is much
    # cheaper than sorting the whole vocabulary, and its values come out sorted just the same.
    partial = max_k <= PARTIAL_SORT_MAX_K
    if partial:
        sorted_logits, order = sub.topk(max_k, dim=-1)
    else:
        sorted_logits, order = sub.sort(dim=-1, descending=True)
    positions = torch.arange(sorted_logits.shape[1], device=device).unsqueeze(0)
    if any(ks[i] < sorted_logits.shape[1] for i in index):
        k_t = to_device([ks[i] for i in index], torch.long, device).unsqueeze(1)
        # By position, not by threshold value, so ties at the k-th value still keep exactly k tokens.
        sorted_logits.masked_fill_(positions >= k_t, float("-inf"))
    if any(top_p[i] < 1.0 for i in index):
        p_t = to_device([top_p[i] for i in index], torch.float64, device).unsqueeze(1)
        probs = sorted_logits.softmax(dim=-1)  # renormalised over what top-k kept
        # Mass strictly before each token, summed in float64 so long tails do not drift past the cut.
        mass_before = probs.cumsum(dim=-1, dtype=torch.float64) - probs.to(torch.float64)
        drop = (mass_before >= p_t - _TOP_P_TOLERANCE) & (p_t < 1.0)
        drop[:, 0] = False  # the most likely token always survives
        sorted_logits.masked_fill_(drop, float("-inf"))

    base = torch.full_like(sub, float("-inf")) if partial else torch.empty_like(sub)
    filtered = base.scatter_(1, order, sorted_logits)
    if index_t is None:
        logits.copy_(filtered)
    else:
        logits[index_t] = filtered


def apply_min_p(logits: torch.Tensor, min_p: list[float]) -> None:
    """In place: drop tokens whose probability is below min_p times the row's most likely token's probability."""
    if not any(p > 0.0 for p in min_p):
        return
    probs = logits.softmax(dim=-1)
    min_p_t = to_device(min_p, probs.dtype, logits.device).unsqueeze(1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p_t
    logits.masked_fill_(probs < threshold, float("-inf"))
