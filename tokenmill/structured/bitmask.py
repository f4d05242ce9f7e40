"""The sampler's one grammar hook: -inf on every token a row's grammar forbids, before any sampling path.

Constrained rows fill their bitmask rows on the host (µs each), the mask goes to the device in one
non-blocking copy, and xgrammar's kernel (Triton on CUDA, a vectorized loop on CPU) masks the logits in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def apply_grammar_bitmask(logits: torch.Tensor, grammars: Sequence[Any | None], copy: bool) -> torch.Tensor:
    """``grammars[i]``: row i's RequestGrammar or None. Returns the masked logits (a copy when ``copy``:
    the caller still reads the raw values, e.g. for logprobs); unconstrained batches return ``logits``."""
    rows = [i for i, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    vocab = logits.shape[1]
    bitmask = torch.full((logits.shape[0], (vocab + 31) // 32), -1, dtype=torch.int32,
                         pin_memory=logits.is_cuda)
    for row in rows:
        grammars[row].fill_bitmask(bitmask, row)
    if copy:
        logits = logits.clone()
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), vocab_size=vocab,
                                    indices=rows if len(rows) < len(grammars) else None)
    return logits
