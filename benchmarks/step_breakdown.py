"""Where an engine step's time goes: host phases and GPU time per step, from wrappers on one LLMEngine instance.

Host phases (wall time on the engine's thread, per ``engine.step()`` call):
  schedule      Scheduler.schedule() (the step record included)
  prepare       ModelRunner.prepare_inputs() (persistent batch update, host arrays, the one host→device copy)
  forward       ModelRunner.run_model() (launching the graph replay or the eager kernels: host time only)
  sample        Sampler.sample() (launching sampling)
  wait          LaunchedStep.result() (the host blocked until the step's sampled ids are on the host)
  land          LLMEngine._land_in_flight() minus its wait (append ids, stop checks, free, prefix-cache, outputs)
  other         step() minus all of the above (the rest of the loop turn)
Steps with prompt tokens (eager) are also grouped by tokens computed: their host launch time against their GPU time.
GPU (CUDA only, CUDA events around each launch, read after the run): ``gpu_ms`` from the step's first enqueued
work to its sampled ids, and ``gap_ms`` the GPU's idle time between the previous step's end and this step's start
(> 0: the GPU waited for the host). sum(gpu_ms) / wall = the engine's GPU-busy share.

Used by gpu_online_vs_offline.py (``--step-breakdown``); alone on any device:
    python benchmarks/step_breakdown.py --preset tiny-llama3 --device cpu --num-prompts 32 --input-len 24 --output-len 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

PHASES = ("schedule", "prepare", "forward", "sample", "wait", "land", "other")


class StepBreakdown:
    """Installs timing wrappers on ``engine`` (instance attributes only; ``remove()`` takes them off)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.cuda = engine.config.model.device.startswith("cuda")
        self.steps: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None
        self._events: list[tuple[Any, Any]] = []  # (start, end) CUDA events per launched step
        self._patched: list[tuple[Any, str]] = []
        runner = engine.runner
        self._wrap_schedule(engine.scheduler)
        # A tensor-parallel executor has neither: its launch, wait and land are still timed.
        if hasattr(runner, "prepare_inputs") and hasattr(runner, "run_model") and hasattr(runner, "sampler"):
            self._wrap(runner, "prepare_inputs", "prepare")
            self._wrap(runner, "run_model", "forward")
            self._wrap(runner.sampler, "sample", "sample")
        self._wrap_launch(runner)
        self._wrap(engine, "_land_in_flight", "land")
        self._wrap_step(engine)

    def _timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._current is not None:
                    self._current[phase] += time.perf_counter() - t0

        return wrapper

    def _wrap(self, owner: Any, name: str, phase: str) -> None:
        setattr(owner, name, self._timed(phase, getattr(owner, name)))
        self._patched.append((owner, name))

    def _wrap_schedule(self, scheduler: Any) -> None:
        timed = self._timed("schedule", scheduler.schedule)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = timed(*args, **kwargs)
            if self._current is not None and not out.is_empty:
                self._current["num_seqs"] += len(out.scheduled)
                self._current["num_tokens"] += out.num_tokens
            return out

        scheduler.schedule = wrapper
        self._patched.append((scheduler, "schedule"))

    def _wrap_launch(self, runner: Any) -> None:
        launch = runner.launch

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = end = None
            if self.cuda:
                import torch

                start = torch.cuda.Event(enable_timing=True)
                start.record()
            launched = launch(*args, **kwargs)
            if self.cuda:
                import torch

                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events.append((start, end))
            if self._current is not None:
                self._current["launches"] += 1
            launched.result = self._timed("wait", launched.result)  # an instance attribute shadows the method
            return launched

        runner.launch = wrapper
        self._patched.append((runner, "launch"))

    def _wrap_step(self, engine: Any) -> None:
        step = engine.step

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            record = dict.fromkeys(PHASES, 0.0) | {"launches": 0, "num_seqs": 0, "num_tokens": 0}
            self._current = record
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                record["step"] = time.perf_counter() - t0
                self._current = None
                self.steps.append(record)

        engine.step = wrapper
        self._patched.append((engine, "step"))

    def remove(self) -> None:
        for owner, name in reversed(self._patched):
            if name in vars(owner):
                delattr(owner, name)
        self._patched.clear()

    def gpu_times(self) -> list[tuple[float, float]]:
        """(gpu_ms, gap_ms before it) per launched step; synchronizes the device."""
        if not self._events:
            return []
        import torch

        torch.cuda.synchronize()
        out, prev_end = [], None
        for start, end in self._events:
            gap = prev_end.elapsed_time(start) if prev_end is not None else 0.0
            out.append((start.elapsed_time(end), max(0.0, gap)))
            prev_end = end
        return out

    def summary(self, wall_s: float | None = None) -> dict[str, Any]:
        """Totals and per-step medians of each phase (ms), split into decode-only steps and the rest."""
        for record in self.steps:
            record["land"] -= record["wait"]  # wait happens inside _land_in_flight
            record["other"] = record["step"] - sum(record[p] for p in PHASES if p != "other")
        gpu = self.gpu_times()
        wall = wall_s if wall_s is not None else sum(r["step"] for r in self.steps)
        result: dict[str, Any] = {"steps": len(self.steps), "wall_s": wall,
                                  "total_ms": {p: 1e3 * sum(r[p] for r in self.steps) for p in (*PHASES, "step")}}
        result["share_of_wall"] = {p: result["total_ms"][p] / (1e3 * wall) if wall else None for p in PHASES}
        decode = [r for r in self.steps if r["num_seqs"] and r["num_tokens"] == r["num_seqs"]]
        for name, group in (("decode_steps", decode), ("all_steps", self.steps)):
            if group:
                result[name] = {"count": len(group),
                                "median_ms": {p: 1e3 * statistics.median(r[p] for r in group) for p in (*PHASES, "step")}}
        result["prompt_steps_by_tokens"] = self._prompt_steps(gpu)
        if gpu:
            busy = sum(g for g, _ in gpu)
            result["gpu"] = {
                "launches": len(gpu), "busy_ms": busy, "busy_share_of_wall": busy / (1e3 * wall) if wall else None,
                "median_gpu_ms": statistics.median(g for g, _ in gpu),
                "idle_gaps_ms_total": sum(gap for _, gap in gpu),
                "median_gap_ms": statistics.median(gap for _, gap in gpu),
                "p90_gap_ms": sorted(gap for _, gap in gpu)[int(0.9 * (len(gpu) - 1))],
            }
        return result


    def _prompt_steps(self, gpu: list[tuple[float, float]]) -> dict[str, dict[str, float]]:
        """Steps that carry prompt tokens (they run eagerly, outside the decode CUDA graphs), by tokens computed:
        median host ms of launching them (prepare + forward + sample) against their GPU ms (first kernel to last, so
        a launch-bound step's GPU time follows its host time; compare both with the tokens' matmul floor). A
        launch-bound step costs every running request that much inter-token latency."""
        buckets: dict[str, list[tuple[float, float | None, int]]] = {}
        launch_index = 0
        for record in self.steps:
            gpu_ms = None
            if gpu and record["launches"]:
                gpu_ms = sum(g for g, _ in gpu[launch_index : launch_index + record["launches"]])
            launch_index += record["launches"]
            if not record["num_seqs"] or record["num_tokens"] == record["num_seqs"]:
                continue
            tokens = record["num_tokens"]
            name = "<=512" if tokens <= 512 else "513-2048" if tokens <= 2048 else ">2048"
            host = 1e3 * (record["prepare"] + record["forward"] + record["sample"])
            buckets.setdefault(name, []).append((host, gpu_ms, tokens))
        out: dict[str, dict[str, float]] = {}
        for name, rows in buckets.items():
            gpu_values = [g for _, g, _ in rows if g is not None]
            out[name] = {"steps": len(rows), "median_tokens": statistics.median(t for _, _, t in rows),
                         "median_launch_host_ms": statistics.median(h for h, _, _ in rows),
                         "median_gpu_ms": statistics.median(gpu_values) if gpu_values else None}
        return out


def print_summary(summary: dict[str, Any]) -> None:
    total = summary["total_ms"]
    print(f"{summary['steps']} steps, {summary['wall_s']:.2f} s wall")
    print("phase      total ms   share   median ms/decode step")
    decode = summary.get("decode_steps", {}).get("median_ms", {})
    for phase in PHASES:
        share = summary["share_of_wall"][phase]
        print(f"{phase:<9}{total[phase]:11.1f}{100 * share if share is not None else float('nan'):7.1f}%"
              f"{decode.get(phase, float('nan')):12.3f}")
    for name, row in summary.get("prompt_steps_by_tokens", {}).items():
        gpu = row["median_gpu_ms"]
        print(f"steps with prompt tokens, {name} tokens: {row['steps']} (median {row['median_tokens']:.0f} tokens), "
              f"median launch (host) "
              f"{row['median_launch_host_ms']:.2f} ms vs GPU {'-' if gpu is None else f'{gpu:.2f}'} ms")
    if "gpu" in summary:
        g = summary["gpu"]
        print(f"GPU busy {g['busy_ms']:.0f} ms = {100 * g['busy_share_of_wall']:.1f}% of wall; median step "
              f"{g['median_gpu_ms']:.2f} ms, idle gaps {g['idle_gaps_ms_total']:.0f} ms (median {g['median_gap_ms']:.3f}, "
              f"p90 {g['p90_gap_ms']:.3f} ms)")


def main(argv: list[str] | None = None) -> None:
    from tokenmill.bench.throughput import sampling_params
    from tokenmill.bench.workloads import range_workload
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-llama3")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=230)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--range-ratio", type=float, default=0.5)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--out", default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    engine = LLMEngine(EngineConfig.from_kwargs(random_weights=args.preset, device=args.device,
                                                max_model_len=args.max_model_len), stream_outputs=False)
    r = args.range_ratio
    requests = range_workload(args.num_prompts, (int(args.input_len * (1 - r)), int(args.input_len * (1 + r))),
                              (int(args.output_len * (1 - r)), int(args.output_len * (1 + r))),
                              engine.model.spec.vocab_size)
    for i, req in enumerate(requests):
        engine.add_request(f"r{i}", req.prompt_token_ids, sampling_params(req.output_len, True, 0.0))
    breakdown = StepBreakdown(engine)
    t0 = time.perf_counter()
    while engine.has_unfinished_requests() or engine.in_flight is not None:
        engine.step()
    summary = breakdown.summary(time.perf_counter() - t0)
    breakdown.remove()
    print_summary(summary)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), **summary}, handle, indent=2)


if __name__ == "__main__":
    main()
