"""Prompt lookup: the longest recent suffix match, its continuation, vectorised and incremental per sequence."""

from __future__ import annotations

import numpy as np

from tokenmill.spec_decode.ngram import NgramProposer, ngram_lookup


def _lookup(tokens, min_n=1, max_n=4, k=3):
    return ngram_lookup(np.asarray(tokens, dtype=np.int64), min_n, max_n, k).tolist()


def test_continuation_of_the_longest_match():
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurred at 0..2 (followed by 9 9 5); the shorter [2, 3] also at 6..7 (followed by 7 8)
    assert _lookup(tokens) == [9, 9, 5]
    assert _lookup(tokens, max_n=2) == [7, 8, 1]  # longest allowed is 2: the latest [2, 3] wins


def test_min_n_and_no_match():
    assert _lookup([1, 2, 3, 4, 5, 3]) == [4, 5, 3]
    assert _lookup([1, 2, 3, 4, 5, 3], min_n=2) == []  # only a 1-token match exists
    assert _lookup([1, 2, 3, 4]) == []
    assert _lookup([7]) == [] and _lookup([]) == []


def test_k_clips_and_full_continuations_are_preferred():
    assert _lookup([5, 6, 7, 8, 9, 5, 6], k=2) == [7, 8]
    # a cycle: the latest match (just before the end) has 1 id after it; an earlier one has k
    assert _lookup([1, 2, 1, 2, 1, 2], max_n=1, k=3) == [1, 2, 1]


def test_proposer_state_grows_incrementally_and_is_released():
    proposer = NgramProposer(1, 3)
    ids = [4, 5, 6, 4]
    assert proposer.propose("a", ids, 2) == [5, 6]
    ids += [5, 6, 7, 4, 5]
    assert proposer.propose("a", ids, 2) == [6, 7]
    assert len(proposer._tokens["a"]) == len(ids)
    proposer.release("a")
    assert "a" not in proposer._tokens
    assert proposer.propose("b", [1, 1], 3) == [1]
