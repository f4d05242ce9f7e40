"""``tokenmill bench kv-memory``: the allocator simulation on small cases whose answers can be worked out by hand,
the command's table, JSON and plot, and the engine run both ways (paged vs whole-request reservation)."""

from __future__ import annotations

import json

import pytest

from tokenmill.bench.kv_memory import FirstFit, Req, simulate_contiguous, simulate_paged
from tokenmill.cli import main


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
    result = simulate_contiguous(reqs, capacity=400, max_model_len=100, reserve="max-model-len")
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


def test_command_reports_the_waste_of_both_allocators(tmp_path, capsys):
    out, png = tmp_path / "kv.json", tmp_path / "kv.png"
    argv = ["bench", "kv-memory", "--num-requests", "60", "--kv-gib", "1"]
    assert main([*argv, "--output-json", str(out), "--plot", str(png)]) == 0
    assert "| paged (simulated) |" in capsys.readouterr().out and png.stat().st_size > 0
    result = json.loads(out.read_text())
    assert result["contiguous"]["internal_waste_pct"] > 50 > result["paged"]["internal_waste_pct"]
    assert result["batch_ratio_paged_over_contiguous"] > 1 and result["device"] == "none (simulation)"
    assert main([*argv, "--kv-cache-dtype", "fp8", "--output-json", str(out)]) == 0
    assert json.loads(out.read_text())["capacity_tokens"] == 2 * result["capacity_tokens"]


def test_command_refuses_requests_longer_than_the_context(capsys):
    argv = ["bench", "kv-memory", "--num-requests", "5", "--max-model-len", "64", "--input-len-range", "40:60",
            "--output-len-range", "30:40"]
    assert main(argv) == 2 and "exceed --max-model-len 64" in capsys.readouterr().err


def test_engine_run_both_ways_reserves_whole_requests(tmp_path, tiny_llama_dir):
    """The tiny model's engine on 24 requests in 40 blocks: reserving prompt + max_tokens at admission keeps
    fewer sequences running and never preempts; paging runs more at once."""
    out = tmp_path / "kv.json"
    argv = ["bench", "kv-memory", "--engine", "--model", str(tiny_llama_dir), "--device", "cpu",
            "--num-kv-blocks", "40", "--block-size", "4", "--num-requests", "24", "--input-len-range", "4:12",
            "--output-len-range", "8:24", "--reserve", "request", "--output-json", str(out)]
    assert main(argv) == 0
    engine = json.loads(out.read_text())["engine"]
    paged, reserved = engine["paged"], engine["reserved"]
    assert reserved["kv_reservation"] == "request" and reserved["preemptions"] == 0
    assert paged["mean_running_seqs"] > reserved["mean_running_seqs"]
    assert reserved["peak_running_seqs"] < paged["peak_running_seqs"] and paged["preemptions"] > 0


@pytest.mark.parametrize("reservation", ["request", "max-model-len"])
def test_whole_request_reservation_changes_the_batch_not_the_tokens(tiny_llama_dir, reservation):
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    prompts = [[(7 * i + j) % 50 + 3 for j in range(5 + i % 7)] for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for mode in ("none", reservation):
        llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=4, num_kv_blocks=48,
                  max_model_len=64, kv_reservation=mode)
        peak = 0
        schedule = llm.engine.scheduler.schedule

        def watched(schedule=schedule):
            nonlocal peak
            out = schedule()
            peak = max(peak, len(out.scheduled))
            return out

        llm.engine.scheduler.schedule = watched
        outputs[mode] = ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], peak,
                         llm.engine.scheduler.num_preemptions)
    assert outputs[reservation][0] == outputs["none"][0] and all(len(t) == 16 for t in outputs["none"][0])
    assert outputs[reservation][1] < outputs["none"][1] and outputs[reservation][2] == 0
