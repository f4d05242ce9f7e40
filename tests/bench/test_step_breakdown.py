"""benchmarks/step_breakdown.py on the real engine (tiny random Llama on CPU): every step is timed, the phases add up
to the step, decode steps are recognised, and the wrappers come off without a trace."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenmill.bench.throughput import sampling_params
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_breakdown.py"


def _module():
    spec = importlib.util.spec_from_file_location("step_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_breakdown_covers_every_step(tiny_llama_dir):
    step_breakdown = _module()
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_model_len=128),
                       stream_outputs=False)
    for i in range(3):
        engine.add_request(f"r{i}", [5, 6, 7 + i], sampling_params(6, True, 0.0))
    breakdown = step_breakdown.StepBreakdown(engine)
    steps = 0
    while engine.has_unfinished_requests() or engine.in_flight is not None:
        engine.step()
        steps += 1
    summary = breakdown.summary()
    breakdown.remove()
    phases = step_breakdown.PHASES
    assert summary["steps"] == steps == len(breakdown.steps)
    for record in breakdown.steps:
        assert all(record[p] >= 0 for p in phases if p != "other")
        assert abs(sum(record[p] for p in phases) - record["step"]) < 1e-9
    assert summary["decode_steps"]["count"] == steps - 1  # one prefill step, then one token per sequence per step
    assert summary["total_ms"]["forward"] > 0 and summary["total_ms"]["schedule"] > 0
    # the prefill step (3 prompts of 3 tokens) is the one step with prompt tokens; no GPU time on CPU
    [(bucket, row)] = summary["prompt_steps_by_tokens"].items()
    assert bucket == "<=512" and row["steps"] == 1 and row["median_tokens"] == 9 and row["median_gpu_ms"] is None
    assert row["median_launch_host_ms"] > 0
    assert "gpu" not in summary  # CPU: no CUDA events
    assert not {"step", "_land_in_flight"} & set(vars(engine)) and "launch" not in vars(engine.runner)
