"""engine/gc_heap.py: the frozen start-up heap with rarer full collections, and the collection timer benchmarks use
to tell whether a run paid for a full collection."""

import gc

from tokenmill.engine.gc_heap import (
    PYTHON_DEFAULT_THRESHOLDS,
    STEADY_THRESHOLDS,
    CollectionTimer,
    freeze_startup_heap,
    unfreeze_heap,
)


def full_collections_while_allocating(objects: int) -> int:
    """Full collections Python runs while ``objects`` small containers are created and kept alive, as a step loop's
    requests in flight are."""
    kept = []
    with CollectionTimer() as timer:
        for i in range(objects):
            kept.append([i])
    return len(timer.pauses_ms)


def test_frozen_heap_makes_full_collections_rarer_and_unfreeze_restores_the_defaults() -> None:
    old = gc.get_threshold()
    try:
        gc.collect()
        gc.set_threshold(*PYTHON_DEFAULT_THRESHOLDS)
        objects = 700 * 10 * 40  # about 40 generation-1 collections' worth
        assert full_collections_while_allocating(objects) >= 2
        freeze_startup_heap()
        assert gc.get_threshold() == STEADY_THRESHOLDS
        assert full_collections_while_allocating(objects) == 0
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
