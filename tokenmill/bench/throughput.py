"""``tokenmill bench throughput``: offline, in-process engine throughput with a per-step roofline.

Drives LLMEngine.step() directly, timing each step between returns of step() and reading its composition
from the scheduler's output; tokenmill.bench.roofline turns that into % of the bandwidth roofline and physical floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.jit_watch import JitWatch
from tokenmill.bench.roofline import (
    H100_COPY_GBPS,
    H100_MATMUL_TFLOPS,
    Ceilings,
    StepShape,
    StoredBytes,
    summarize,
)
from tokenmill.bench.workloads import (
    OfflineRequest,
    fixed_workload,
    parse_range,
    range_workload,
    sharegpt_workload,
)
from tokenmill.engine.gc_heap import freeze_startup_heap, unfreeze_heap

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bench throughput`` (engine flags keep the names of ``tokenmill generate``)."""
    from tokenmill.engine.cli import add_engine_arguments

    e = parser.add_argument_group("engine")
    add_engine_arguments(e, model_flag=True)
    e.add_argument("--tokenizer", default=None, help="tokenizer dir or .gguf (default: the model's own)")
    w = parser.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=int, default=512)
    w.add_argument("--output-len", type=int, default=None,
                   help="default 128; with --dataset it replaces the replies' lengths")
    w.add_argument("--input-len-range", default=None, help="LOW:HIGH, uniform (needs --output-len-range)")
    w.add_argument("--output-len-range", default=None, help="LOW:HIGH, uniform (needs --input-len-range)")
    w.add_argument("--dataset", default=None, help="ShareGPT-format JSON file")
    w.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    w.add_argument("--temperature", type=float, default=1.0)
    w.add_argument("--warmup-requests", type=int, default=4, help="short untimed requests first (JIT, caches)")
    r = parser.add_argument_group("roofline and output")
    r.add_argument("--bandwidth-gbps", type=float, default=H100_COPY_GBPS, help="measured copy bandwidth, GB/s")
    r.add_argument("--matmul-tflops", type=float, default=H100_MATMUL_TFLOPS, help="measured bf16 matmul rate")
    r.add_argument("--profile", default=None, metavar="DIR", help="write a torch profiler chrome trace here")
    r.add_argument("--profile-steps", type=int, default=64, help="engine steps to keep in the profile")
    r.add_argument("--profile-start", type=int, default=0, help="first engine step to profile (0-based)")
    r.add_argument("--output-json", default=None, metavar="PATH")


def engine_kwargs_from(args: argparse.Namespace) -> dict[str, Any]:
    from tokenmill.engine.cli import engine_kwargs

    if args.model is None and args.random_weights is None:
        raise ValueError("give --model (HF dir or .gguf) or --random-weights PRESET")
    kwargs = engine_kwargs(args)
    if args.tokenizer:
        kwargs["tokenizer"] = args.tokenizer
    return kwargs


# ---- per-step measurement ------------------------------------------------------------------------
class StepRecorder:
    """Wraps ``engine.scheduler.schedule`` to note each step's shape before the runner changes it."""

    def __init__(self, engine: Any) -> None:
        self._scheduler = engine.scheduler
        self._original = engine.scheduler.schedule
        self.pending: StepShape | None = None
        self._scheduler.schedule = self._schedule  # instance attribute shadows the method

    def _schedule(self) -> Any:
        out = self._original()
        if out.is_empty:
            self.pending = None
        else:
            items = out.scheduled
            self.pending = StepShape(
                cached=tuple(i.seq.num_computed_tokens for i in items),
                new=tuple(i.num_tokens for i in items),
                num_sampled=sum(1 for entry in out.record.scheduled if entry.samples),  # a flag, not a property
            )
        return out

    def take(self) -> StepShape | None:
        shape, self.pending = self.pending, None
        return shape

    def detach(self) -> None:
        del self._scheduler.schedule


def device_sync(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return lambda: torch.cuda.synchronize(torch.device(device))
    return lambda: None


@dataclass
class OfflineResult:
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    steps: list[StepShape] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)
    profile_summary: dict[str, Any] | None = None
    # Triton kernel variants compiled during the timed run (each one's time sits in one step's time)
    jit_compiles: list[dict[str, Any]] = field(default_factory=list)

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    @property
    def requests_s(self) -> float:
        return self.num_requests / self.elapsed_s


def sampling_params(output_len: int, ignore_eos: bool, temperature: float) -> Any:
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(max_tokens=output_len, min_tokens=output_len if ignore_eos else 0,
                          ignore_eos=ignore_eos, temperature=temperature)


def run_offline(
    engine: Any,
    requests: list[OfflineRequest],
    ignore_eos: bool = True,
    temperature: float = 1.0,
    profile_dir: str | None = None,
    profile_steps: int = 64,
    id_prefix: str = "r",
    profile_start: int = 0,
) -> OfflineResult:
    """Add every request, then step the engine until done, timing each ``step()`` call.

    No device sync per step (it would undo async scheduling): each call returns once a step's sampled ids
    are on the host, so the time between returns is that step's time. With async scheduling the step that
    lands in a call is the one launched by the call before, and its time is credited to that step's shape.
    With ``profile_dir``, steps ``profile_start`` .. ``profile_start + profile_steps - 1`` are profiled.
    """
    device = engine.config.model.device
    sync = device_sync(device)
    for i, req in enumerate(requests):
        engine.add_request(f"{id_prefix}{i}", req.prompt_token_ids,
                           sampling_params(req.output_len, ignore_eos, temperature))
    recorder = StepRecorder(engine)
    result = OfflineResult(0.0, len(requests), sum(len(r.prompt_token_ids) for r in requests), 0)
    profiler, profile_t0 = None, 0.0
    overlapped = engine.async_scheduling
    launched: StepShape | None = None  # async: the step in flight, which lands in the next call
    unattributed = 0.0  # time of calls in which no step landed (the first launch)
    with JitWatch() as watch:
        try:
            sync()
            start = time.perf_counter()
            t1 = start
            while engine.has_unfinished_requests() or engine.in_flight is not None:
                index = len(result.steps)
                t0 = t1
                if profile_dir and index == profile_start and profiler is None and result.profile_summary is None:
                    profiler = _start_profiler(device)
                    t0 = profile_t0 = time.perf_counter()  # the profiler's start-up is not a step's time
                watch.step = index
                with _step_range(index, profiler is not None):
                    outputs = engine.step()
                    t1 = time.perf_counter()
                for out in outputs:
                    if out.finished:
                        result.output_tokens += sum(len(c.token_ids) for c in out.outputs)
                shape = recorder.take()
                landed, launched = (launched, shape) if overlapped else (shape, None)
                if landed is None:
                    unattributed += t1 - t0
                else:
                    result.steps.append(landed)
                    result.step_times_s.append(t1 - t0 + unattributed)
                    unattributed = 0.0
                if profiler is not None and len(result.steps) >= profile_start + profile_steps:
                    profiler.stop()
                    result.profile_summary = _write_profile(profiler, Path(profile_dir), len(result.steps) - profile_start,
                                                            t1 - profile_t0)
                    profiler = None
                    t1 = time.perf_counter()  # writing the trace is not the next step's time either
            result.elapsed_s = time.perf_counter() - start
        finally:
            recorder.detach()
    result.jit_compiles = watch.summary()
    if profiler is not None:  # the run ended inside the profiled window
        profiler.stop()
        result.profile_summary = _write_profile(profiler, Path(profile_dir), len(result.steps) - profile_start,
                                                time.perf_counter() - profile_t0)
    return result


def warm_up(engine: Any, num_requests: int, vocab_size: int, input_len: int = 16, output_len: int = 8,
            temperature: float = 1.0) -> None:
    """Untimed requests so one-time costs (Triton JIT, allocator growth) stay out of the timed run."""
    if num_requests < 1:
        return
    warm = fixed_workload(num_requests, input_len, output_len, vocab_size, seed=12345)
    run_offline(engine, warm, ignore_eos=True, temperature=temperature, id_prefix="warmup-")


def warm_up_mixed_steps(engine: Any, vocab_size: int, input_len: int = 256, output_len: int = 8,
                        temperature: float = 1.0) -> None:
    """Twice the engine's token budget of prompts: later ones prefill while earlier ones decode, so the
    allocator reaches its mixed-step sizes (and anything start-up missed compiles) before the timed run."""
    budget = engine.config.scheduler.max_num_batched_tokens
    # a short --max-model-len must still fit a warm-up prompt plus its outputs
    input_len = max(1, min(input_len, engine.max_model_len - output_len))
    warm_up(engine, 8 + 2 * budget // input_len, vocab_size, input_len, output_len, temperature=temperature)


# ---- profiler -------------------------------------------------------------------------------------
def _start_profiler(device: str) -> Any:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    profiler.start()
    return profiler


@contextmanager
def _step_range(index: int, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    import torch

    nvtx = torch.cuda.nvtx.range(f"step {index}") if torch.cuda.is_available() else nullcontext()
    with nvtx, torch.profiler.record_function(f"step {index}"):
        yield


def kernel_category(name: str) -> str:
    """Coarse bucket of a GPU kernel by name: gemm, attention, softmax, norm/rope/act, sampling, copy, other."""
    low = name.lower()
    if any(k in low for k in ("gemm", "cutlass", "xmma", "nvjet", "matmul", "cublas", "sm90_", "sm80_")):
        return "gemm"
    if any(k in low for k in ("attn", "attention", "flash", "paged", "sdpa")):
        return "attention"
    if "softmax" in low:  # sampling over the vocabulary or an unfused attention: the trace tells which
        return "softmax"
    if any(k in low for k in ("rms", "norm", "rotary", "rope", "silu", "act_and_mul")):
        return "norm/rope/act"
    if any(k in low for k in ("sort", "topk", "multinomial", "argmax", "exponential", "sampl", "gumbel")):
        return "sampling"
    if any(k in low for k in ("memcpy", "memset", "copy", "cat", "index", "scatter", "gather", "fill")):
        return "copy/index"
    return "other"


def _device_self_time_us(event: Any) -> float:
    # torch renamed cuda_* to device_* timings; read whichever this version has.
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, attr, None)
        if value is not None:
            return float(value)
    return 0.0


def _write_profile(profiler: Any, directory: Path, num_steps: int, wall_s: float) -> dict[str, Any]:
    """Chrome trace + text table + GPU time per kernel category (the rest of the wall time is gaps)."""
    directory.mkdir(parents=True, exist_ok=True)
    trace = directory / "trace.json"
    profiler.export_chrome_trace(str(trace))
    averages = profiler.key_averages()
    on_gpu = any(_device_self_time_us(e) > 0 for e in averages)
    table = averages.table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=40)
    (directory / "summary.txt").write_text(table + "\n")
    categories: dict[str, float] = {}
    for event in averages:
        us = _device_self_time_us(event)
        # The per-step NVTX/record_function ranges also show up as GPU events spanning their kernels:
        # skip them, or every kernel would count twice.
        annotation = getattr(event, "is_user_annotation", False) or event.key.startswith("step ")
        if us > 0 and not annotation and "CUDA" in str(getattr(event, "device_type", "")):
            key = kernel_category(event.key)
            categories[key] = categories.get(key, 0.0) + us / 1e6
    busy = sum(categories.values())
    summary = {
        "trace": str(trace),
        "table": str(directory / "summary.txt"),
        "profiled_steps": num_steps,
        "profiled_wall_s": wall_s,
        "gpu_time_s_by_category": categories,
        "gpu_busy_s": busy,
        "gpu_idle_s": max(0.0, wall_s - busy) if on_gpu else None,
    }
    (directory / "categories.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---- reporting ------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def step_summary(result: OfflineResult) -> dict[str, Any]:
    """Decode step time by batch size, prefill/mixed totals, and a compact per-step list."""
    by_batch: dict[int, list[float]] = {}
    other_n, other_s = 0, 0.0
    for shape, seconds in zip(result.steps, result.step_times_s, strict=True):
        if shape.is_decode:
            by_batch.setdefault(len(shape.new), []).append(seconds)
        else:
            other_n, other_s = other_n + 1, other_s + seconds
    return {
        "decode_ms_median_by_batch": {
            str(b): {"steps": len(t), "median_ms": 1e3 * statistics.median(t)} for b, t in sorted(by_batch.items())
        },
        "prefill_or_mixed_steps": other_n,
        "prefill_or_mixed_s": other_s,
        # [num_seqs, tokens computed, cached tokens read, milliseconds] per step
        "steps": [[len(s.new), s.num_tokens, sum(s.cached), round(1e3 * t, 4)]
                  for s, t in zip(result.steps, result.step_times_s, strict=True)],
    }


def build_requests(args: argparse.Namespace, engine: Any) -> list[OfflineRequest]:
    vocab = engine.model.spec.vocab_size
    if args.dataset:
        hf = engine.tokenizer.hf if engine.tokenizer is not None else None
        return sharegpt_workload(args.dataset, args.num_prompts, hf, seed=args.seed, output_len=args.output_len,
                                 max_total_len=engine.max_model_len)
    if (args.input_len_range is None) != (args.output_len_range is None):
        raise ValueError("--input-len-range and --output-len-range go together; give both or neither")
    if args.input_len_range:
        return range_workload(args.num_prompts, parse_range(args.input_len_range, "--input-len-range"),
                              parse_range(args.output_len_range, "--output-len-range"), vocab, seed=args.seed)
    output_len = args.output_len if args.output_len is not None else 128
    return fixed_workload(args.num_prompts, args.input_len, output_len, vocab, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench throughput``: a user error becomes one line on stderr and exit status 2."""
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"tokenmill bench throughput: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm_engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ceilings = Ceilings(args.bandwidth_gbps, args.matmul_tflops)
    engine = LLMEngine.from_kwargs(stream_outputs=False, **engine_kwargs_from(args))  # offline: finished outputs only
    spec = engine.model.spec
    device = engine.config.model.device
    dtype_bytes = engine.config.model.torch_dtype.itemsize
    requests = build_requests(args, engine)
    freeze_startup_heap()  # full collections during the run skip the start-up heap
    try:
        warm_up(engine, args.warmup_requests, spec.vocab_size, temperature=args.temperature)
        if device.startswith("cuda") and args.warmup_requests > 0:
            warm_up_mixed_steps(engine, spec.vocab_size, temperature=args.temperature)
        spec_before = engine.spec_decode_stats.copy() if engine.spec_decode_stats is not None else None
        result = run_offline(engine, requests, ignore_eos=args.ignore_eos, temperature=args.temperature,
                             profile_dir=args.profile, profile_steps=args.profile_steps,
                             profile_start=args.profile_start)
    finally:
        unfreeze_heap()  # a caller in the same process (a test) may build other engines after this one
    roof = summarize(spec, result.steps, result.step_times_s, ceilings, dtype_bytes, stored_bytes(engine))
    print_report(result, roof.to_dict(), engine.model_name, device)
    spec_stats = engine.spec_decode_stats.since(spec_before).summary() if spec_before is not None else None
    if spec_stats is not None:  # the timed run's drafts only (warm-up excluded)
        print(f"speculative decoding: acceptance rate {spec_stats['acceptance_rate']:.3f}, mean acceptance length "
              f"{spec_stats['mean_acceptance_length']:.2f}, {spec_stats['num_drafts']} drafts, accepted per position "
              f"{spec_stats['accepted_per_pos']}")
    if args.output_json:
        record = {
            "benchmark": "throughput",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": device_name(device),
            "command": shlex.join(sys.argv),  # this process's exact argv
            "config": {k: v for k, v in vars(args).items() if k != "func"},
            "model": engine.model_name,
            "dtype": str(engine.config.model.torch_dtype),
            "kv_cache_tokens": engine.num_kv_cache_tokens,
            "ceilings": {"bandwidth_gbps": ceilings.bandwidth_gbps, "matmul_tflops": ceilings.matmul_tflops},
            "results": {
                "elapsed_s": result.elapsed_s, "num_requests": result.num_requests,
                "prompt_tokens": result.prompt_tokens, "output_tokens": result.output_tokens,
                "output_tok_s": result.output_tok_s, "total_tok_s": result.total_tok_s,
                "requests_s": result.requests_s,
            },
            "roofline": roof.to_dict(),
            "per_step": step_summary(result),
            "profile": result.profile_summary,
            "jit_compiles_in_timed_run": result.jit_compiles,
            "spec_decode": spec_stats,
        }
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def stored_bytes(engine: Any) -> StoredBytes:
    """The bytes the roofline counts for this engine: its weights as served (quantized codes and scales, FP8; all
    ranks' shards: the roofline is one GPU's bandwidth against the whole model, as for bf16) and its KV cache's
    bytes a value. Dense models in their dtype come out as the spec's formula (the parameters are the spec's)."""
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    return StoredBytes(weights=weights * engine.config.runner.tensor_parallel_size,
                       kv_element=engine.config.cache.kv_cache_spec(1, 1, engine.config.model.torch_dtype)
                       .dtype.itemsize)


def print_report(result: OfflineResult, roof: dict[str, float], model: str, device: str) -> None:
    print(f"\nmodel {model} on {device_name(device)}: {result.num_requests} requests, "
          f"{result.prompt_tokens} prompt + {result.output_tokens} output tokens")
    print(f"elapsed            {result.elapsed_s:10.3f} s")
    print(f"requests/s         {result.requests_s:10.2f}")
    print(f"output tok/s       {result.output_tok_s:10.1f}")
    print(f"total tok/s        {result.total_tok_s:10.1f}")
    print(f"engine steps       {roof['num_steps']:10d}  ({roof['num_decode_steps']} decode-only)")
    print(f"decode roofline    {roof['decode_roofline_pct']:9.1f} %  "
          f"(bytes/bandwidth {roof['decode_roofline_s']:.3f} s of {roof['decode_measured_s']:.3f} s measured)")
    print(f"physical floor     {roof['floor_pct']:9.1f} %  "
          f"(max(FLOPs/rate, bytes/bandwidth) {roof['floor_s']:.3f} s of {roof['measured_s']:.3f} s in steps)")
    print(f"prefill matmul     {roof['prefill_matmul_pct']:9.1f} %  "
          f"(FLOPs/rate {roof['prefill_compute_s']:.3f} s of {roof['prefill_measured_s']:.3f} s in prefill/mixed steps)")
    if result.jit_compiles:
        seconds = sum(c["seconds"] for c in result.jit_compiles)
        names = sorted({c["kernel"] for c in result.jit_compiles})
        print(f"JIT in timed run   {len(result.jit_compiles)} Triton compile(s), {seconds:.2f} s inside step times: "
              f"{', '.join(names)}")
    if result.profile_summary:
        prof = result.profile_summary
        print(f"profile            {prof['trace']} ({prof['profiled_steps']} steps, {prof['profiled_wall_s']:.3f} s; "
              "the profiler slows the steps it records)")
        for name, seconds in sorted(prof["gpu_time_s_by_category"].items(), key=lambda kv: -kv[1]):
            print(f"  gpu {name:<14} {seconds:9.4f} s")
        if prof["gpu_idle_s"] is not None:
            print(f"  gpu idle (launch gaps, Python, syncs) {prof['gpu_idle_s']:.4f} s")
