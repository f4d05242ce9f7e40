"""Engine logprobs (one {token id: Logprob} dict per generated token) → the completions and chat JSON shapes.

The engine's dict holds the sampled token first, then the top-k by rank (1-based).
"""

from __future__ import annotations

import math
from typing import Any

from tokenmill.outputs import Logprob

# OpenAI reports an impossible token's logprob as -9999.0; JSON cannot carry -inf.
MIN_LOGPROB = -9999.0


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MIN_LOGPROB


def token_text(tokenizer: Any, token_id: int, logprob: Logprob | None = None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    return sorted(ranked, key=lambda item: item[1].rank or 0)[:k]


def completion_logprobs(
    tokenizer: Any,
    token_ids: list[int],
    logprobs: list[dict[int, Logprob]],
    k: int,
    text_offset_start: int,
) -> dict[str, Any]:
    """The /v1/completions ``logprobs`` object for ``token_ids`` (aligned with ``logprobs``)."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = text_offset_start
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        text = token_text(tokenizer, token_id, sampled)
        tokens.append(text)
        token_logprobs.append(_finite(sampled.logprob) if sampled is not None else None)
        top: dict[str, float] = {}
        for tid, lp in _top(entry, k):
            # Distinct ids can decode alike (partial UTF-8 → U+FFFD); keep the better-ranked one.
            top.setdefault(token_text(tokenizer, tid, lp), _finite(lp.logprob))
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def chat_logprobs(tokenizer: Any, token_ids: list[int], logprobs: list[dict[int, Logprob]], k: int) -> dict[str, Any]:
    """The /v1/chat/completions ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    content = []
    for token_id, entry in zip(token_ids, logprobs, strict=False):
        sampled = entry.get(token_id)
        text = token_text(tokenizer, token_id, sampled)
        top = [
            {"token": (t := token_text(tokenizer, tid, lp)), "logprob": _finite(lp.logprob), "bytes": list(t.encode())}
            for tid, lp in _top(entry, k)
        ]
        content.append({
            "token": text,
            "logprob": _finite(sampled.logprob) if sampled is not None else MIN_LOGPROB,
            "bytes": list(text.encode()),
            "top_logprobs": top,
        })
    return {"content": content}
