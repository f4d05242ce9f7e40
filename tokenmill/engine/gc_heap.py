"""Keep Python's cyclic collector off the start-up heap of a process that holds one engine for its life.

The step loop allocates a few hundred container objects per step (per-request entries and token lists), so the
collector runs every step or so, and now and then a full collection rescans everything built at start-up
(modules, tokenizer, graphs: ~300k objects). Measured on an H100 with llama3-8b, 128 x 512 -> 128: one
120-150 ms stall per run. Freezing moves the start-up objects out of the collector's generations (vLLM's engine
core does the same); ``unfreeze_heap`` hands them back before a process builds another engine.

Freezing alone still leaves a full collection every ten young-generation-1 collections, scanning whatever the
requests in flight hold: on the H100 at max load (1024 requests, llama3-8b, 2026-12-07) ten of them, 10-46 ms each,
in a 5.4 s FP8 run whose GPU then sat idle for 190 ms. While frozen, the oldest generation's threshold is raised
(STEADY_THRESHOLDS), so full collections come ten times less often; young collections, which find the step loop's
short-lived cycles, keep Python's defaults.
"""

from __future__ import annotations

import gc
import time
from types import TracebackType

PYTHON_DEFAULT_THRESHOLDS = (700, 10, 10)
# Young collections as Python's defaults; a full one every 100 generation-1 collections instead of every 10.
STEADY_THRESHOLDS = (700, 10, 100)


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, exempt every surviving object from later collections and make full
    collections rarer (STEADY_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*STEADY_THRESHOLDS)


def unfreeze_heap() -> None:
    """Return frozen objects to the collector (an engine about to be dropped may sit in reference cycles) and
    Python's default thresholds."""
    gc.unfreeze()
    gc.set_threshold(*PYTHON_DEFAULT_THRESHOLDS)


class CollectionTimer:
    """Records each collection of ``generation`` (2: full) run inside the ``with`` block, as milliseconds: a
    benchmark shows whether one of its runs paid for a collection the other did not."""

    def __init__(self, generation: int = 2) -> None:
        self.generation = generation
        self.pauses_ms: list[float] = []
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if info.get("generation") != self.generation:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses_ms.append(round((time.perf_counter() - self._started) * 1e3, 3))
            self._started = None

    def __enter__(self) -> CollectionTimer:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        gc.callbacks.remove(self._callback)
