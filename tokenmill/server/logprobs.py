"""Engine logprobs (one {token id: Logprob} dict per generated token) → the completions and chat JSON shapes.

The engine's dict holds the sampled token first, then the top-k by rank (1-based).
"""

from __future__ import annotations

import math
import re
from functools import cache
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


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


@cache
def _byte_level_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte <-> printable-char table

    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Any, token_id: int, text: str) -> list[int]:
    """The token's own UTF-8 bytes: ``text`` encoded, unless decoding lost a partial character to U+FFFD.

    A token that holds only part of a multi-byte character decodes to U+FFFD; its real bytes come from the
    vocabulary piece (a byte-level BPE piece, or a ``<0xNN>`` byte-fallback piece).
    """
    if "\ufffd" not in text:
        return list(text.encode())
    convert = getattr(getattr(tokenizer, "hf", tokenizer), "convert_ids_to_tokens", None)
    piece = convert(token_id) if convert is not None else None
    if isinstance(piece, str) and piece:
        if match := _BYTE_FALLBACK.fullmatch(piece):
            return [int(match.group(1), 16)]
        decoder = _byte_level_decoder()
        if all(char in decoder for char in piece):
            return [decoder[char] for char in piece]
    return list(text.encode())


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
            {"token": (t := token_text(tokenizer, tid, lp)), "logprob": _finite(lp.logprob),
             "bytes": token_bytes(tokenizer, tid, t)}
            for tid, lp in _top(entry, k)
        ]
        content.append({
            "token": text,
            "logprob": _finite(sampled.logprob) if sampled is not None else MIN_LOGPROB,
            "bytes": token_bytes(tokenizer, token_id, text),
            "top_logprobs": top,
        })
    return {"content": content}
