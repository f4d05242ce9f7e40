"""Host cost of one decode step's bookkeeping at batch B. Runs on any machine (no GPU).

Parts (default): schedule (the step record included), the runner's persistent-batch update and the host arrays of
the step's inputs, without a model. ``--engine``: a whole ``LLMEngine.step()`` (schedule, inputs, sampler, landing,
stop checks, outputs) over a tiny model whose forward pass is replaced by a fixed logits tensor, so what is timed
is the Python a GPU engine runs per step while its graph replays (issue 22: at max_num_seqs 1024 it must stay
under the GPU's step time, or async scheduling cannot hide it). Per phase (benchmarks/step_breakdown.py's).

    python benchmarks/step_host_cost.py --batches 1,32,256 --out $OUT/step_host_cost.json
    OMP_NUM_THREADS=1 python benchmarks/step_host_cost.py --engine --opcodes --batches 256,1024 --out /tmp/host.json
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_record import write_record

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request, Sequence
from tokenmill.runner.input_batch import InputBatch
from tokenmill.runner.inputs import step_arrays
from tokenmill.sampling_params import SamplingParams

BLOCK_SIZE = 16


def measure(batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    """Median microseconds per decode step of each part, after every sequence is prefilled."""
    bm = BlockManager(batch * (prompt_len + steps + 32) // BLOCK_SIZE + batch, BLOCK_SIZE, True)
    sched = Scheduler(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len), bm)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 16)
    for i in range(batch):
        prompt = list(range(i, i + prompt_len))
        request = Request(f"r{i}", None, prompt, params)
        sched.add(Sequence(f"r{i}", 0, request, prompt, params, seed=None, detokenizer=None,
                           token_limit=prompt_len + steps + 16))
    inputs = InputBatch(torch.device("cpu"))
    parts: dict[str, list[float]] = {"schedule": [], "batch_update": [], "step_arrays": []}
    gc.disable()
    try:
        for step in range(steps + 1):
            t0 = time.perf_counter()
            out = sched.schedule()
            t1 = time.perf_counter()
            inputs.update(out.record)
            t2 = time.perf_counter()
            step_arrays(out.record, inputs, BLOCK_SIZE)
            t3 = time.perf_counter()
            if step:  # step 0 is the prefill
                for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    parts[name].append(seconds * 1e6)
            for item in out.scheduled:  # what landing does: computed tokens move on, one new token each
                item.seq.num_computed_tokens += item.num_tokens
                item.seq.token_ids.append(7)
    finally:
        gc.enable()
    return {name: sorted(v)[len(v) // 2] for name, v in parts.items()}


def stub_engine(batch: int, steps: int, prompt_len: int) -> Any:
    """An engine over tiny-llama with ``batch`` greedy requests (``min_tokens`` = ``max_tokens``, as ``bench
    throughput --ignore-eos`` asks) whose forward pass returns a fixed logits tensor; all prompts fit one step, so
    every decode step runs the full batch. Overlapped steps, as on a GPU."""
    from tokenmill.bench.throughput import sampling_params
    from tokenmill.bench.workloads import fixed_workload
    from tokenmill.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_kwargs(
        random_weights="tiny-llama", device="cpu", dtype="float32", max_model_len=prompt_len + steps + 8,
        max_num_seqs=batch, max_num_batched_tokens=batch * prompt_len, async_scheduling=True, stream_outputs=False,
        num_kv_blocks=batch * ((prompt_len + steps) // BLOCK_SIZE + 2) + 8)
    vocab = 64  # the stub's logits: wide enough for the EOS ids min_tokens masks, cheap to argmax
    logits = torch.zeros(batch, vocab)
    engine.runner.run_model = lambda inputs: logits[: len(inputs.sample_rows)]
    for i, request in enumerate(fixed_workload(batch, prompt_len, steps, vocab, seed=batch)):
        engine.add_request(f"r{i}", request.prompt_token_ids, sampling_params(steps, True, 0.0))
    return engine


def measure_engine(batch: int, steps: int, prompt_len: int) -> dict[str, float]:
    """Median milliseconds per decode step of each phase of ``LLMEngine.step()`` (``stub_engine``), the start-up
    heap frozen as ``bench throughput`` does."""
    from step_breakdown import PHASES, StepBreakdown

    from tokenmill.engine.gc_heap import freeze_startup_heap, unfreeze_heap

    engine = stub_engine(batch, steps, prompt_len)
    breakdown = StepBreakdown(engine)
    freeze_startup_heap()
    try:
        while engine.has_unfinished_requests() or engine.in_flight is not None:
            engine.step()
    finally:
        unfreeze_heap()
    breakdown.remove()
    summary = breakdown.summary()
    return {phase: ms for phase, ms in summary["decode_steps"]["median_ms"].items() if phase in (*PHASES, "step")}


def count_engine_ops(batch: int, steps: int, prompt_len: int, counted_steps: int = 8) -> dict[str, float]:
    """Python opcodes and calls per row of a full-batch decode step (``stub_engine``): a count, not a time, so it
    compares two versions on a box whose load swings the timings by 2x. C work (numpy, torch) is not in it."""
    engine = stub_engine(batch, steps, prompt_len)
    for _ in range(4):  # the prefill and the first decode steps
        engine.step()
    counts = {"opcodes": 0, "calls": 0}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts["opcodes"] += 1
        return local

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        counts["calls"] += 1
        frame.f_trace_opcodes = True
        return local

    sys.settrace(on_call)
    try:
        for _ in range(counted_steps):
            engine.step()
    finally:
        sys.settrace(None)
    return {name: value / counted_steps / batch for name, value in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--engine", action="store_true",
                        help="time whole engine steps (forward pass stubbed) instead of the three parts")
    parser.add_argument("--opcodes", action="store_true",
                        help="with --engine: also count Python opcodes and calls per row per step (deterministic)")
    parser.add_argument("--out", default=None, help="write the timings as JSON here")
    args = parser.parse_args()
    if args.engine:
        return main_engine(args)
    rows = []
    print(f"{'batch':>5} {'schedule us':>12} {'update us':>10} {'arrays us':>10} {'total us':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        timing = measure(batch, args.steps, args.prompt_len)
        total = sum(timing.values())
        rows.append({"batch": batch, **timing, "total": total})
        print(f"{batch:5d} {timing['schedule']:12.0f} {timing['batch_update']:10.0f} {timing['step_arrays']:10.0f} "
              f"{total:9.0f}")
    if args.out:
        write_record(Path(args.out), "step_host_cost", device=f"cpu ({platform.processor() or platform.machine()})",
                     timings_us=rows)


def main_engine(args: argparse.Namespace) -> None:
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        timing = measure_engine(batch, args.steps, args.prompt_len)
        rows.append({"batch": batch, **timing, "us_per_row": 1e3 * timing["step"] / batch})
        parts = "  ".join(f"{name} {ms:.2f}" for name, ms in timing.items() if name != "step")
        print(f"batch {batch:5d}: {timing['step']:7.2f} ms per decode step ({rows[-1]['us_per_row']:.1f} us/row); "
              f"{parts}", flush=True)
        if args.opcodes:
            ops = count_engine_ops(batch, args.steps, args.prompt_len)
            rows[-1].update({f"{name}_per_row": value for name, value in ops.items()})
            print(f"             {ops['opcodes']:.0f} Python opcodes and {ops['calls']:.1f} calls per row per step",
                  flush=True)
    if args.out:
        write_record(Path(args.out), "step_host_cost_engine", device=f"cpu ({platform.processor() or platform.machine()})",
                     timings_ms=rows)


if __name__ == "__main__":
    main()
