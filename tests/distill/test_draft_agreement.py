"""benchmarks/distill_draft_agreement.py's replay: greedy speculation decided by the draft's hits along the target's
own answer (a round takes the leading hits, at most k, plus the target's token)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _script():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("distill_draft_agreement", ROOT / "benchmarks" / "distill_draft_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_take_the_leading_hits_up_to_k_plus_one_token():
    script = _script()
    hits = [True, True, False, True, True, True, True, True, False]
    # round 1: hits at 0, 1, miss at 2 -> 3 tokens; round 2: 4 hits (k) -> 5 tokens; round 3: a miss -> 1 token
    assert script.implied_acceptance_length(hits, 4) == [3, 5, 1]
    assert script.implied_acceptance_length(hits, 1) == [2, 1, 2, 2, 2]
    assert script.implied_acceptance_length([True, True], 4) == [2]  # the answer ends inside a round
    assert script.implied_acceptance_length([False] * 3, 4) == [1, 1, 1]


def test_summary_counts_rounds_whose_first_drafts_were_all_accepted():
    script = _script()
    row = script.summarize([("p", [True, True, False, True, True, True, True, True, False])], 4)
    assert row["accepted_per_position"] == [2, 2, 1, 1]  # rounds of 3, 5 and 1 tokens
    assert row["implied_mean_acceptance_length"] == 3.0 and row["rounds"] == 3
    assert row["top1_agreement"] == round(7 / 9, 4) and row["per_prompt"][0]["hits"] == "11.11111."
