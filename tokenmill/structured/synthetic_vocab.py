"""A BPE-like grammar vocabulary for random-weight presets, whose synthetic tokenizer cannot spell JSON.

The presets' serving tokenizer (model/synthetic_tokenizer.py) has one word per id (``t<id>``): no token holds a
brace or a quote, so no grammar can start with it (GrammarCompiler rejects such a grammar). Benchmarks that
constrain a random-weight model hand the engine's GrammarCompiler this vocabulary instead, as many pieces as
the model has ids: the 256 single bytes, then pieces drawn like a byte-level BPE vocabulary's — mostly words
(with or without a leading space), some digit runs, and about one in ten pieces of punctuation and whitespace
(code-heavy vocabularies such as Llama-3's have more of those than SmolLM2's 4%). The mix matters: the grammar
engine's per-token mask time depends on how many tokens are ambiguous in a state (pieces mixing quotes,
braces and letters are); a vocabulary of uniformly random characters made two thirds of them so and cost
~100x SmolLM2's mask time inside a bounded string, which no real tokenizer does.
The ids decode to ``t<id>`` text while the grammar sees these pieces; only the ids (and their count) mean anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PUNCTUATION = ".,:;!?\"'(){}[]-_/=<>*#@&%+\\|"
WHITESPACE = " \n\t"
WORD_SHARE = 0.88  # pure words; then DIGIT_SHARE digit runs; the rest punctuation/whitespace pieces
DIGIT_SHARE = 0.02


def _piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < WORD_SHARE:
        word = "".join(rng.choice(LETTERS) for _ in range(min(2 + int(rng.expovariate(0.3)), 14)))
        if rng.random() < 0.15:
            word = word.capitalize()
        return (" " if rng.random() < 0.6 else "") + word
    if kind < WORD_SHARE + DIGIT_SHARE:
        return "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
    symbols = PUNCTUATION + WHITESPACE
    piece = "".join(rng.choice(symbols) for _ in range(rng.randint(1, 4)))
    return piece + (rng.choice(LETTERS) * rng.randint(0, 1))  # some end in a letter, e.g. '("a'


def synthetic_vocabulary(vocab_size: int, seed: int = 0) -> list[str]:
    """``vocab_size`` distinct pieces: ids 0-255 are the bytes (printable ones as themselves), then BPE-like pieces."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= 256 for a byte-level synthetic vocabulary")
    rng = random.Random(seed)
    vocab = [chr(b) if 32 <= b < 127 else f"<0x{b:02X}>" for b in range(256)]
    seen = set(vocab)
    while len(vocab) < vocab_size:
        piece = _piece(rng)
        if piece not in seen:
            seen.add(piece)
            vocab.append(piece)
    return vocab


def synthetic_tokenizer_info(vocab_size: int, stop_token_ids: Iterable[int], seed: int = 0) -> Any:
    """An xgrammar TokenizerInfo over ``synthetic_vocabulary`` (for GrammarCompiler's ``tokenizer_info``)."""
    import xgrammar as xgr

    return xgr.TokenizerInfo(synthetic_vocabulary(vocab_size, seed), vocab_type=xgr.VocabType.RAW,
                             vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
