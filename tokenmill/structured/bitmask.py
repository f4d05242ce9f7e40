"""The sampler's one grammar hook: -inf on every token a row's grammar forbids, before any sampling path.

All constrained rows of a step are filled by one xgrammar call that spreads them over its threads, into a host
buffer reused across steps (pinned on CUDA); the buffer goes to the device in one non-blocking copy and
xgrammar's kernel (Triton on CUDA, a vectorized loop on CPU) masks the logits in place. The engine lands the
previous step just before this runs (engine/llm_engine.py), so the fill overlaps the step's forward pass.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.transfer import to_device


@dataclass
class BitmaskStats:
    """Host time spent filling masks (cumulative): what a constrained row adds to a step."""

    fill_seconds: float = 0.0
    num_fills: int = 0  # steps with at least one constrained row
    num_rows: int = 0  # rows filled over those steps


MAX_FILL_THREADS = 8  # 256 rows of ~50 µs fill in ~2 ms, well inside an 8B model's decode step


def default_fill_threads() -> int:
    """Half the CPUs this process may run on (xgrammar's "auto" counts the whole host, which in a container
    limited to a few cores would oversubscribe them), at most MAX_FILL_THREADS."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(MAX_FILL_THREADS, cpus // 2))


class GrammarBitmask:
    """One per sampler: the reusable host/device bitmask buffers and xgrammar's batch filler."""

    def __init__(self, max_threads: int | None = None) -> None:
        """``max_threads``: xgrammar's fill threads (None: ``default_fill_threads()``)."""
        self.max_threads = max_threads if max_threads is not None else default_fill_threads()
        self.stats = BitmaskStats()
        self._filler: Any = None  # xgrammar.BatchGrammarMatcher, made on first use (xgrammar is optional)
        self._host: torch.Tensor | None = None
        self._device: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # the last host -> device copy; the host buffer is free after it

    def apply(self, logits: torch.Tensor, grammars: Sequence[Any | None], copy: bool) -> torch.Tensor:
        """``grammars[i]``: row i's RequestGrammar or None. Returns the masked logits (a copy when ``copy``: the
        caller still reads the raw values, e.g. for logprobs); batches without a live grammar return ``logits``.
        A grammar that has ended (its sequence finished when the previous step landed; this row is surplus)
        is skipped."""
        rows = [i for i, grammar in enumerate(grammars) if grammar is not None and grammar.needs_mask]
        if not rows:
            return logits
        import xgrammar as xgr

        num_rows, vocab = logits.shape
        host = self._host_buffer(num_rows, (vocab + 31) // 32, logits.is_cuda)
        if self._filler is None:
            self._filler = xgr.BatchGrammarMatcher(self.max_threads)
        start = time.perf_counter()
        self._filler.batch_fill_next_token_bitmask([grammars[i].matcher for i in rows], host, rows)
        self.stats.fill_seconds += time.perf_counter() - start
        self.stats.num_fills += 1
        self.stats.num_rows += len(rows)
        if copy:
            logits = logits.clone()
        bitmask = host[:num_rows]
        if logits.is_cuda:
            if self._device is None or self._device.shape != host.shape or self._device.device != logits.device:
                self._device = torch.empty_like(host, device=logits.device)
            self._device[:num_rows].copy_(bitmask, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
            bitmask = self._device[:num_rows]
        indices = None if len(rows) == num_rows else to_device(rows, torch.int32, logits.device)
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=indices)
        return logits

    def _host_buffer(self, num_rows: int, words: int, pinned: bool) -> torch.Tensor:
        if self._copied is not None:  # the previous step's copy may still be reading the buffer
            self._copied.synchronize()
        host = self._host
        if host is None or host.shape[0] < num_rows or host.shape[1] != words:
            rows = max(num_rows, host.shape[0] if host is not None and host.shape[1] == words else 0)
            host = self._host = torch.empty((rows, words), dtype=torch.int32, pin_memory=pinned)
            self._device = None
        return host
