"""The engine-core loop's account of itself (step() time by kind of step, Triton compiles while serving) and the
core process's torch thread count, on the real tiny Llama on CPU."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from tokenmill.bench.jit_watch import JitWatch
from tokenmill.config import EngineConfig
from tokenmill.engine.core_messages import CoreOutputs
from tokenmill.engine.core_proc import EngineCore
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.threads import set_engine_threads
from tokenmill.sampling_params import SamplingParams


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_engine_core_counts_decode_and_prompt_steps(tiny_llama_dir):
    # Async scheduling keeps the launched step in flight after step(): what the core classifies.
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_model_len=128,
                                                async_scheduling=True))
    engine.detokenize_outputs = False
    core = EngineCore(engine, None, None)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
    core.add("a", [5, 6, 7, 8], params, None, time.monotonic(), reply)
    core.step(reply)  # a's prompt
    core.step(reply)  # a decodes
    core.add("b", [9, 10, 11], params, None, time.monotonic(), reply)
    core.step(reply)  # b's prompt beside a's decode: a mixed step
    while engine.has_unfinished_requests():
        core.step(reply)
    stats = core.loop_stats
    assert len(stats.step_seconds["prompt"]) == 2
    assert stats.num_steps == core.num_steps
    # the last call only lands the final step (nothing launched): counted, not classified
    assert len(stats.step_seconds["decode"]) >= 5
    assert len(stats.step_seconds["decode"]) + 2 < stats.num_steps + 1
    line = stats.summary_line()
    assert line.startswith(f"engine core loop: {core.num_steps} steps; ")
    assert "prompt steps 2: step() p50" in line and "decode steps" in line


def test_step_trace_keeps_each_turn_with_its_step_kind(tiny_llama_dir, tmp_path):
    import json

    from tokenmill.engine.core_loop_stats import CoreLoopStats

    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_model_len=128,
                                                async_scheduling=True))
    engine.detokenize_outputs = False
    core = EngineCore(engine, None, None)
    core.loop_stats = stats = CoreLoopStats(str(tmp_path / "steps.jsonl"))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    reply = CoreOutputs(accepted=[], rejected=[], outputs=[])
    core.add("a", [5, 6, 7, 8, 9], params, None, time.monotonic(), reply)
    turn = 0
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        core.step(reply)
        stats.record_turn(start, 0.0, 0.001, time.perf_counter() - start, 0.0, int(turn == 0))
        turn += 1
    stats.write_trace()
    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(rows) == turn
    assert rows[0]["kind"] == "prompt" and rows[0]["tokens"] == 5 and rows[0]["rows"] == 1
    assert rows[0]["messages"] == 1 and rows[1]["messages"] == 0
    assert {row["kind"] for row in rows[1:-1]} == {"decode"}
    assert all(row["tokens"] == 1 for row in rows[1:-1])
    assert rows[-1]["kind"] == "landed"  # the last call only lands the final step
    assert all(row["step"] > 0 for row in rows) and rows == sorted(rows, key=lambda row: row["start"])


def test_compiles_while_serving_are_logged_and_counted(caplog):
    from tokenmill.engine.core_loop_stats import CoreLoopStats

    stats = CoreLoopStats()
    watch = JitWatch(on_compile=stats._on_compile)
    with caplog.at_level(logging.WARNING, logger="tokenmill.engine.core"):
        watch._before()  # Triton's hooks, as its JIT calls them around a compile
        watch._after(key="_prefill_kernel", repr="variant")
    assert [kernel for kernel, _ in stats.jit_compiles] == ["_prefill_kernel"]
    assert "Triton compiled _prefill_kernel while serving" in caplog.text
    assert "Triton compiles while serving 1" in stats.summary_line()


def test_core_threads_one_on_gpu_all_but_one_on_cpu(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert set_engine_threads(on_cpu=False) == 1
    assert torch.get_num_threads() == 1
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert set_engine_threads(on_cpu=True) == 3
    assert torch.get_num_threads() == 3


def test_core_threads_leave_a_user_setting(monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert set_engine_threads(on_cpu=False) == 2
    assert torch.get_num_threads() == 2
