"""Acceptance of draft tokens in a verification row: the longest prefix the target agrees with, plus one token.

The target sampled a token after the row's last accepted token and after each draft. Draft i is accepted while
every earlier draft was and it equals the target's token at its position; the target's token at the first
mismatch (or after the last draft: the bonus token) ends the list. Greedy rows thus emit exactly plain decoding's
tokens. Sampled rows emit only target samples, each drawn given an accepted prefix, so their distribution is the
target's too; issue 23's rejection sampling against a draft distribution accepts more often.
"""

from __future__ import annotations


def accept_drafts(draft_token_ids: list[int], sampled: list[int]) -> list[int]:
    """``sampled``: the target's k + 1 tokens for k drafts. Returns the 1..k+1 tokens the sequence gains."""
    if len(sampled) != len(draft_token_ids) + 1:
        raise ValueError(f"{len(draft_token_ids)} drafts need {len(draft_token_ids) + 1} sampled tokens; "
                         f"got {len(sampled)}")
    num_accepted = 0
    for draft, target in zip(draft_token_ids, sampled, strict=False):
        if draft != target:
            break
        num_accepted += 1
    return sampled[: num_accepted + 1]
