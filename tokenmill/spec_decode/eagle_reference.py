"""Greedy speculative decoding with an EAGLE head (distill/eagle_head.py) in a plain batch-1 reference loop over a
transformers target: the measurement tool for the head's acceptance length and a CPU timing, not the engine path
(engine integration needs the runner to hand back the last-layer hidden states of accepted positions).

A round: the head drafts k tokens from the target's features of the accepted prefix (feeding its own predicted
features after the first); the target verifies [last token, d_1..d_k] in one forward; the longest prefix of drafts
equal to the target's greedy tokens is kept, plus the target's own next token; both KV caches drop the rest, and
the head re-reads the accepted positions with the target's true features. The output is the target's greedy
output exactly; acceptance length = tokens emitted per verifying forward (the prefill's first token not counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tokenmill.distill.eagle_head import EagleHead, KVCache
from tokenmill.model.hf_cache import kv_cache_kwargs


class EagleDrafter:
    """The head's state for one sequence: its KV cache over positions read with the target's true features, and the
    predicted features after the last of them. ``rows_ids``: the draft vocabulary (None: the whole head)."""

    def __init__(self, head: EagleHead, rows_ids: torch.Tensor | None = None) -> None:
        self.head = head
        self.rows_ids = rows_ids
        self.rows = head.lm_head if rows_ids is None else head.lm_head[rows_ids].contiguous()
        self.cache = KVCache()
        self.last: torch.Tensor | None = None  # [h]: predicted features of the position after the cache

    def token(self, features: torch.Tensor) -> int:
        best = int((features @ self.rows.T).argmax())
        return best if self.rows_ids is None else int(self.rows_ids[best])

    @torch.no_grad()
    def extend(self, next_ids: torch.Tensor, features: torch.Tensor) -> None:
        """Read positions c..c+T-1 (c = cache length): ``next_ids`` [T] = x_{t+1}, ``features`` [T, h] = f_t."""
        start = self.cache.length
        pred = self.head(next_ids[None], features[None].float(), start, self.cache)
        self.last = pred[0, -1]

    @torch.no_grad()
    def propose(self, k: int) -> list[int]:
        committed = self.cache.length
        feats, drafts = self.last, [self.token(self.last)]
        for _ in range(k - 1):
            pred = self.head(torch.tensor([[drafts[-1]]]), feats[None, None], self.cache.length, self.cache)
            feats = pred[0, -1]
            drafts.append(self.token(feats))
        self.cache.truncate(committed)
        return drafts


def accepted_count(drafts: list[int], target: list[int]) -> int:
    """Leading drafts equal to the target's greedy tokens at the same positions."""
    n = 0
    while n < len(drafts) and drafts[n] == target[n]:
        n += 1
    return n


@dataclass
class SpecResult:
    tokens: list[int]
    round_lengths: list[int] = field(default_factory=list)  # tokens emitted per verifying forward


@torch.no_grad()
def replay(head: EagleHead, ids: torch.Tensor, features: torch.Tensor, prompt_len: int, k: int,
           rows_ids: torch.Tensor | None = None) -> list[int]:
    """Tokens per round of greedy EAGLE decoding of a sequence whose target output (``ids`` after ``prompt_len``)
    and features are known: the same drafter and acceptance rule as ``speculative_greedy``, the target's forward
    replaced by the cached features (exact for greedy: the target's tokens and features do not depend on the
    drafts)."""
    drafter = EagleDrafter(head, rows_ids)
    end = ids.numel()
    drafter.extend(ids[1 : prompt_len + 1], features[:prompt_len])  # the prefill, which emitted ids[prompt_len]
    m, lengths = prompt_len, []
    while m < end - 1:
        remaining = end - 1 - m
        drafts = drafter.propose(min(k, remaining))
        a = accepted_count(drafts, ids[m + 1 : m + 1 + len(drafts)].tolist())
        lengths.append(min(a + 1, remaining))
        step = lengths[-1]
        drafter.extend(ids[m + 1 : m + 1 + step], features[m : m + step])
        m += step
    return lengths


def _target_step(target: nn.Module, ids: list[int], cache) -> torch.Tensor:
    out = target.model(torch.tensor([ids]), use_cache=True, **kv_cache_kwargs(target.model, cache))
    return out.last_hidden_state[0].float()


@torch.no_grad()
def plain_greedy(target: nn.Module, prompt_ids: list[int], max_new: int, eos_id: int | None) -> list[int]:
    """The target alone, one token per forward, with its KV cache."""
    from transformers import DynamicCache

    cache = DynamicCache()
    head = target.get_output_embeddings().weight
    feats = _target_step(target, prompt_ids, cache)
    tokens = [int((feats[-1] @ head.T).argmax())]
    while len(tokens) < max_new and tokens[-1] != eos_id:
        feats = _target_step(target, tokens[-1:], cache)
        tokens.append(int((feats[-1] @ head.T).argmax()))
    return tokens


@torch.no_grad()
def speculative_greedy(target: nn.Module, drafter: EagleDrafter, prompt_ids: list[int], k: int, max_new: int,
                       eos_id: int | None) -> SpecResult:
    """Greedy decoding of ``target`` with ``drafter`` proposing k tokens a round (see the module docstring)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    head = target.get_output_embeddings().weight
    feats = _target_step(target, prompt_ids, cache)
    result = SpecResult([int((feats[-1] @ head.T).argmax())])
    drafter.extend(torch.tensor(prompt_ids[1:] + result.tokens), feats)
    while len(result.tokens) < max_new and result.tokens[-1] != eos_id:
        m = cache.get_seq_length()  # the last token sits at position m, not yet read by the target
        drafts = drafter.propose(min(k, max_new - len(result.tokens)))
        feats = _target_step(target, result.tokens[-1:] + drafts, cache)
        greedy = (feats @ head.T).argmax(-1).tolist()
        a = accepted_count(drafts, greedy)
        new = drafts[:a] + [greedy[a]]
        cache.crop(-(cache.get_seq_length() - (m + a + 1)))  # transformers 5: a negative count drops that many
        drafter.extend(torch.tensor(new), feats[: a + 1])
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        new = new[: max_new - len(result.tokens)]
        result.tokens += new
        result.round_lengths.append(len(new))
    return result
