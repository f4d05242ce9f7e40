"""engine/gc_heap.py: the frozen start-up heap with rarer full collections, and the collection timer benchmarks use
to tell whether a run paid for a full collection."""

import gc
import subprocess
import sys

from tokenmill.engine.gc_heap import (
    PYTHON_DEFAULT_THRESHOLDS,
    STEADY_THRESHOLDS,
    CollectionTimer,
    freeze_startup_heap,
    unfreeze_heap,
)

# Run in a fresh interpreter: whether Python starts a full collection depends on the size of the heap it already
# holds (a pytest worker's is large and varies), a bare interpreter's is small and fixed.
COUNT_FULL_COLLECTIONS = """
import gc, sys
from tokenmill.engine.gc_heap import CollectionTimer, freeze_startup_heap
gc.collect()
if sys.argv[1] == "frozen":
    freeze_startup_heap()
kept = []
with CollectionTimer() as timer:
    for i in range(700 * 10 * 40):  # about 40 generation-1 collections' worth, kept alive like requests in flight
        kept.append([i])
print(len(timer.pauses_ms), gc.get_threshold())
"""


def full_collections_while_allocating(mode: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", COUNT_FULL_COLLECTIONS, mode], capture_output=True, text=True,
                          check=True, timeout=120)
    count, thresholds = done.stdout.strip().split(" ", 1)
    return int(count), thresholds


def test_frozen_heap_makes_full_collections_rarer() -> None:
    default_count, default_thresholds = full_collections_while_allocating("default")
    frozen_count, frozen_thresholds = full_collections_while_allocating("frozen")
    assert default_thresholds == str(PYTHON_DEFAULT_THRESHOLDS) and default_count >= 2
    assert frozen_thresholds == str(STEADY_THRESHOLDS) and frozen_count == 0


def test_unfreeze_restores_the_default_thresholds() -> None:
    old = gc.get_threshold()
    try:
        freeze_startup_heap()
        assert gc.get_threshold() == STEADY_THRESHOLDS
        unfreeze_heap()
        assert gc.get_threshold() == PYTHON_DEFAULT_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*old)


def test_collection_timer_records_full_collections_only() -> None:
    with CollectionTimer() as timer:
        gc.collect(0)  # a young collection: not what the timer watches
        gc.collect()
        gc.collect()
    assert len(timer.pauses_ms) == 2
    assert all(ms >= 0.0 for ms in timer.pauses_ms)
    assert timer._callback not in gc.callbacks  # unregistered on exit
    gc.collect()
    assert len(timer.pauses_ms) == 2


def test_collection_timer_watches_the_generation_asked() -> None:
    with CollectionTimer(generation=0) as timer:
        gc.collect(0)
        gc.collect(1)
    assert len(timer.pauses_ms) == 1
