"""benchmarks/kv_memory.py's allocator simulation on small cases whose answers can be worked out by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kv_memory import FirstFit, Req, main, simulate_contiguous, simulate_paged  # noqa: E402


def test_first_fit_reuses_and_coalesces_freed_ranges():
    space = FirstFit(100)
    a, b, c = space.alloc(30), space.alloc(30), space.alloc(30)
    assert (a, b, c) == (0, 30, 60) and space.alloc(20) is None
    space.release(b, 30)
    assert space.alloc(40) is None  # 10 + 30 free, but not in one piece: external fragmentation
    space.release(a, 30)
    assert space.alloc(60) == 0  # the two neighbours merged


def test_contiguous_reserving_max_model_len_fits_capacity_over_max_len_requests():
    reqs = [Req(prompt=10, output=5)] * 8
    result = simulate_contiguous(reqs, capacity=400, max_model_len=100, reserve="max_model_len")
    # 4 requests at a time, 5 steps each: two waves.
    assert result["steps"] == 10 and result["peak_running_seqs"] == 4
    # Step j (1..5) of a wave uses 4 * (10 + j) of 400 reserved slots: mean used 13 / 100.
    assert result["used_pct"] == pytest.approx(13.0)
    assert result["internal_waste_pct"] == pytest.approx(87.0)


def test_paged_holds_only_whole_blocks_of_what_is_stored():
    reqs = [Req(prompt=10, output=5)] * 8
    result = simulate_paged(reqs, capacity=400, block=4, shared_prefix=0)
    assert result["steps"] == 5 and result["peak_running_seqs"] == 8 and result["preemptions"] == 0
    # Each sequence holds 11..15 tokens in ceil(/4) blocks: 12,12,16,16,16 slots for 11..15 tokens.
    used = sum(8 * t for t in range(11, 16))
    held = 8 * (12 + 12 + 16 + 16 + 16)
    assert result["internal_waste_pct"] == pytest.approx(100 * (held - used) / (400 * 5))


def test_paged_shares_prompt_blocks_between_samples_and_a_common_prefix():
    alone = simulate_paged([Req(prompt=16, output=2, n=4)], capacity=1000, block=4, shared_prefix=0)
    # 4 full prompt blocks once + per sample 1 block for its generated tokens: 4 + 4 = 8 blocks, 16 + 4*t stored.
    assert alone["used_pct"] == pytest.approx(100 * ((16 + 4) + (16 + 8)) / 2 / 1000)
    shared = simulate_paged([Req(16, 2), Req(16, 2)], capacity=1000, block=4, shared_prefix=16)
    unshared = simulate_paged([Req(16, 2), Req(16, 2)], capacity=1000, block=4, shared_prefix=0)
    assert shared["used_pct"] < unshared["used_pct"]  # the prefix is stored once


def test_paged_preempts_instead_of_overflowing():
    result = simulate_paged([Req(prompt=8, output=12)] * 3, capacity=48, block=4, shared_prefix=0)
    # 12 blocks: three requests start (3 blocks each) but cannot all grow to 5 blocks; one is recomputed later.
    assert result["preemptions"] > 0 and result["peak_running_seqs"] == 3 and result["steps"] > 12


def test_main_reports_the_waste_of_both_allocators(tmp_path):
    out = tmp_path / "kv.json"
    result = main(["--num-requests", "60", "--kv-gib", "1", "--out", str(out)])
    assert result["contiguous"]["internal_waste_pct"] > 50 > result["paged"]["internal_waste_pct"]
    assert result["batch_ratio_paged_over_contiguous"] > 1 and out.is_file()
    fp8 = main(["--num-requests", "60", "--kv-gib", "1", "--kv-cache-dtype", "fp8"])
    assert fp8["capacity_tokens"] == 2 * result["capacity_tokens"]
