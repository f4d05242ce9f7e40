"""engine/gc_heap.py: the collection timer benchmarks use to tell whether a run paid for a full collection."""

import gc

from tokenmill.engine.gc_heap import CollectionTimer


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
