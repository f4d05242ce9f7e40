"""N-gram (prompt lookup) proposer: the tokens that followed the latest earlier occurrence of the sequence's last
n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``), searched in the prompt and output so far.

No model: one vectorised numpy pass per sequence and step (candidates are the earlier positions of the last token,
each extended backwards). Token ids are kept per sequence in an append-only buffer (a sequence's accepted ids only
grow), so a step converts only the new ids.
"""

from __future__ import annotations

from array import array

import numpy as np


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` ids that followed an earlier occurrence of the longest suffix of ``tokens`` of length
    ``min_n..max_n``; among equally long matches the latest one that still has ``k`` ids after it (else the one
    with the most). Empty when no suffix of ``min_n`` tokens occurred before."""
    length = len(tokens)
    if length < min_n + 1 or k < 1:
        return tokens[:0]
    # Candidate match ends e < length - 1 (the suffix itself is excluded) with tokens[e] == the last token.
    ends = np.flatnonzero(tokens[: length - 1] == tokens[-1])
    if not len(ends):
        return tokens[:0]
    match_len = np.ones(len(ends), dtype=np.int64)
    alive = np.ones(len(ends), dtype=bool)
    for j in range(1, min(max_n, length - 1)):
        back = ends - j
        ok = alive & (back >= 0)
        ok[ok] = tokens[back[ok]] == tokens[length - 1 - j]
        alive = ok
        if not alive.any():
            break
        match_len += alive
    keep = match_len >= min_n
    if not keep.any():
        return tokens[:0]
    ends, match_len = ends[keep], match_len[keep]
    follow = np.minimum(length - 1 - ends, k)
    # Longest match first, then most ids to propose, then the latest occurrence.
    best = np.lexsort((ends, follow, match_len))[-1]
    start = int(ends[best]) + 1
    return tokens[start : start + int(follow[best])]


class NgramProposer:
    """Prompt-lookup proposals per sequence id (state: each live sequence's ids as an int64 buffer)."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max; got {prompt_lookup_min}, "
                             f"{prompt_lookup_max}")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max
        self._tokens: dict[str, array] = {}

    def propose(self, seq_id: str, token_ids: list[int], max_num_tokens: int) -> list[int]:
        buffer = self._tokens.get(seq_id)
        if buffer is None or len(buffer) > len(token_ids):
            buffer = self._tokens[seq_id] = array("q")
        buffer.extend(token_ids[len(buffer) :])
        tokens = np.frombuffer(buffer, dtype=np.int64)
        return ngram_lookup(tokens, self.min_n, self.max_n, max_num_tokens).tolist()

    def release(self, seq_id: str) -> None:
        self._tokens.pop(seq_id, None)
