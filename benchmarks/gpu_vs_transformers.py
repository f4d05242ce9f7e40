"""tokenmill vs transformers `generate` on the same random weights and prompts, against the physical floor.

Workloads (issue 4): (a) Llama-3-8B 128 × 512 → 128; (b) Llama-3-8B batch-1 128 → 256; (c) Qwen3-0.6B 256
sequences, input and output lengths uniform in 100–1024 (transformers as static batches of 64 in arrival
order); (d) tokenmill decode step time for batch 1…256 against the bandwidth roofline.

Usage (H100): python benchmarks/gpu_vs_transformers.py [--workloads a,b,c,d] [--out PATH]
Smoke test:   python benchmarks/gpu_vs_transformers.py --quick --preset tiny-llama --device cpu
transformers weights are built from the preset's config with a fixed seed and copied in memory into tokenmill
(``load_weights(hf.state_dict().items())``), so both run the same numbers. Anything estimated says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.bench.roofline import (
    H100_COPY_GBPS,
    H100_MATMUL_TFLOPS,
    Ceilings,
    bandwidth_time,
    summarize,
)
from tokenmill.bench.throughput import OfflineResult, device_name, run_offline, warm_up_mixed_steps
from tokenmill.bench.workloads import OfflineRequest, fixed_workload, range_workload
from tokenmill.engine.gc_heap import freeze_startup_heap, unfreeze_heap
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.model.presets import preset_spec
from tokenmill.model.spec import ModelSpec


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    preset: str
    requests: list[OfflineRequest]
    hf_batch: int  # transformers static batch size (arrival order)
    hf_batches_measured: int | None = None  # None: all; else time only the first N batches and scale


@dataclass(frozen=True)
class Sizes:
    a: tuple[int, int, int]  # prompts, input, output
    b: tuple[int, int]  # input, output
    c: tuple[int, int, int, int]  # sequences, low, high, transformers batch
    d_batches: tuple[int, ...]
    d_lens: tuple[int, int]  # input, output per sequence in the decode sweep


FULL = Sizes(a=(128, 512, 128), b=(128, 256), c=(256, 100, 1024, 64),
             d_batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), d_lens=(512, 32))
QUICK = Sizes(a=(8, 32, 8), b=(16, 16), c=(16, 8, 32, 8), d_batches=(1, 2, 4), d_lens=(16, 6))


@dataclass
class Row:
    workload: str
    engine: str
    output_tokens: int
    elapsed_s: float
    floor_s: float | None = None
    decode_roofline_pct: float | None = None
    prefill_matmul_pct: float | None = None
    profile: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def floor_pct(self) -> float | None:
        return None if self.floor_s is None else 100.0 * self.floor_s / self.elapsed_s


# ---- transformers side ---------------------------------------------------------------------------
def hf_config(spec: ModelSpec) -> Any:
    """A transformers config with exactly the preset's shape (rope, tying, qk-norm included)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling:
        rope = {**spec.rope_scaling, "rope_theta": spec.rope_theta}
    common = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, rms_norm_eps=spec.rms_norm_eps,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    classes = {"LlamaForCausalLM": LlamaConfig, "MistralForCausalLM": MistralConfig,
               "Qwen2ForCausalLM": Qwen2Config, "Qwen3ForCausalLM": Qwen3Config}
    extra: dict[str, Any] = {}
    if spec.architecture == "MistralForCausalLM":
        extra["sliding_window"] = None
    if spec.architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        extra["use_sliding_window"] = False
    return classes[spec.architecture](**common, **extra)


def build_hf_model(spec: ModelSpec, dtype: torch.dtype, device: str, seed: int) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def hf_generate_batch(model: Any, batch: list[OfflineRequest], device: str) -> float:
    """One static, left-padded `generate` batch, exactly max(output) new tokens each; seconds."""
    width = max(len(r.prompt_token_ids) for r in batch)
    new = max(r.output_len for r in batch)
    ids = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch], device=device)
    mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in batch],
                        device=device)
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():  # generate_batch fails under inference_mode (GPU_NOTES); keep generate alike
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
    _sync(device)
    return time.perf_counter() - start


def run_transformers(model: Any, wl: Workload, device: str) -> Row:
    batches = [wl.requests[i:i + wl.hf_batch] for i in range(0, len(wl.requests), wl.hf_batch)]
    measured = batches if wl.hf_batches_measured is None else batches[:wl.hf_batches_measured]
    seconds = sum(hf_generate_batch(model, b, device) for b in measured)
    row = Row(wl.key, "transformers", sum(r.output_len for r in wl.requests), seconds)
    if len(measured) < len(batches):
        # Decode steps dominate a static batch and each runs max(output) steps, so scale by that.
        steps_all = sum(max(r.output_len for r in b) for b in batches)
        steps_measured = sum(max(r.output_len for r in b) for b in measured)
        row.elapsed_s = seconds * steps_all / steps_measured
        row.notes.append(f"ESTIMATED: timed {len(measured)} of {len(batches)} static batches ({seconds:.1f} s), "
                         f"scaled by decode steps {steps_all}/{steps_measured}")
    if len(batches) > 1 or wl.hf_batch < len(wl.requests):
        row.notes.append(f"static batches of {wl.hf_batch}, left-padded; tok/s counts requested tokens only")
    return row


# ---- tokenmill side ------------------------------------------------------------------------------
def build_engine(preset: str, args: argparse.Namespace, max_model_len: int, hf_model: Any | None) -> LLMEngine:
    engine = LLMEngine.from_kwargs(
        random_weights=preset, dtype=args.dtype, device=args.device, max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager, seed=args.seed, stream_outputs=False,
    )
    if hf_model is not None:
        with torch.no_grad():  # copies in place, so captured CUDA graphs keep their parameter addresses
            engine.model.load_weights(hf_model.state_dict().items())
    freeze_startup_heap()  # as `tokenmill serve` and `bench throughput` do; _free unfreezes before the next engine
    return engine


def tokenmill_row(engine: LLMEngine, wl: Workload, ceilings: Ceilings,
                  profile_dir: str | None = None) -> tuple[Row, OfflineResult]:
    result = run_offline(engine, wl.requests, ignore_eos=True, temperature=0.0, id_prefix=f"{wl.key}-")
    roof = summarize(engine.model.spec, result.steps, result.step_times_s, ceilings,
                     engine.config.model.torch_dtype.itemsize)
    row = Row(wl.key, "tokenmill", result.output_tokens, result.elapsed_s, floor_s=roof.floor_s,
              decode_roofline_pct=roof.decode_roofline_pct)
    row.notes.append(f"{roof.num_steps} steps, {roof.num_decode_steps} decode-only; "
                     f"step time {roof.measured_s:.3f} s of {result.elapsed_s:.3f} s wall; floor {roof.floor_s:.3f} s")
    if roof.prefill_measured_s > 0:
        row.notes.append(f"prefill/mixed steps: {roof.prefill_measured_s:.3f} s at "
                         f"{roof.prefill_matmul_pct:.1f}% of the matmul rate")
    row.prefill_matmul_pct = roof.prefill_matmul_pct
    mixed_ms = [round(1e3 * t) for shape, t in zip(result.steps, result.step_times_s, strict=True) if not shape.is_decode]
    if mixed_ms:
        row.notes.append(f"prefill/mixed step ms: {mixed_ms}")
    if result.jit_compiles:
        seconds = sum(c["seconds"] for c in result.jit_compiles)
        where = ", ".join(f"{c['kernel']} (step {c['step']}, {c['seconds']:.2f} s)" for c in result.jit_compiles)
        row.notes.append(f"Triton compiled {len(result.jit_compiles)} variant(s) in the timed run, {seconds:.2f} s: {where}")
    else:
        row.notes.append("no Triton compile in the timed run")
    if profile_dir:
        # A second, profiled run of the same workload (the timed run above stays unprofiled); its window
        # sits mid-run where decode and mixed steps happen.
        window = 32
        again = run_offline(engine, wl.requests, ignore_eos=True, temperature=0.0, id_prefix=f"{wl.key}-prof-",
                            profile_dir=str(Path(profile_dir) / wl.key), profile_steps=window,
                            profile_start=max(0, len(result.steps) // 2 - window // 2))
        row.profile = again.profile_summary
        if row.profile:
            parts = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in
                              sorted(row.profile["gpu_time_s_by_category"].items(), key=lambda kv: -kv[1]))
            idle = row.profile["gpu_idle_s"]
            row.notes.append(f"profile of {row.profile['profiled_steps']} steps ({1e3 * row.profile['profiled_wall_s']:.1f}"
                             f" ms): GPU ms {parts or '(no GPU kernels recorded)'}"
                             + (f"; idle {1e3 * idle:.1f}" if idle is not None else ""))
    return row, result


def decode_sweep(engine: LLMEngine, sizes: Sizes, ceilings: Ceilings, seed: int) -> list[dict[str, Any]]:
    """(d): median decode-only step time at each batch size against bytes / bandwidth for that step."""
    spec, itemsize = engine.model.spec, engine.config.model.torch_dtype.itemsize
    budget = engine.config.scheduler.max_num_batched_tokens
    rows = []
    for batch in sizes.d_batches:
        output_len = decode_sweep_output_len(batch, sizes, budget)
        requests = fixed_workload(batch, sizes.d_lens[0], output_len, spec.vocab_size, seed=seed + batch)
        result = run_offline(engine, requests, ignore_eos=True, temperature=0.0, id_prefix=f"d{batch}-")
        full = [(s, t) for s, t in zip(result.steps, result.step_times_s, strict=True)
                if s.is_decode and len(s.new) == batch]
        if not full:
            continue
        measured = statistics.median(t for _, t in full)
        roofline = statistics.median(bandwidth_time(spec, s, ceilings, itemsize) for s, _ in full)
        rows.append({"batch": batch, "output_len": output_len, "steps": len(full), "median_step_ms": 1e3 * measured,
                     "roofline_ms": 1e3 * roofline, "roofline_pct": 100.0 * roofline / measured,
                     "tok_s": batch / measured, "jit_compiles": result.jit_compiles})
    return rows


def decode_sweep_output_len(batch: int, sizes: Sizes, max_num_batched_tokens: int) -> int:
    """Prompts are prefilled a token budget at a time while earlier ones already decode; generate long
    enough that all ``batch`` sequences then decode together for ``sizes.d_lens[1]`` steps."""
    per_step = max(1, max_num_batched_tokens - batch)  # decoding sequences take one budget token each
    prefill_steps = -(-batch * sizes.d_lens[0] // per_step)
    return prefill_steps + sizes.d_lens[1]


def max_sweep_len(sizes: Sizes, max_num_batched_tokens: int) -> int:
    return sizes.d_lens[0] + max(decode_sweep_output_len(b, sizes, max_num_batched_tokens) for b in sizes.d_batches)


# ---- plumbing --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _free(device: str) -> None:
    unfreeze_heap()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def make_workloads(keys: list[str], sizes: Sizes, preset: str | None, seed: int, hf_batches_c: int) -> list[Workload]:
    out = []
    for key in keys:
        if key == "a":
            p = preset or "llama3-8b"
            n, i, o = sizes.a
            out.append(Workload("a", f"{p} {n} × {i} → {o}", p,
                                fixed_workload(n, i, o, preset_spec(p).vocab_size, seed), hf_batch=n))
        elif key == "b":
            p = preset or "llama3-8b"
            i, o = sizes.b
            out.append(Workload("b", f"{p} batch 1, {i} → {o}", p,
                                fixed_workload(1, i, o, preset_spec(p).vocab_size, seed + 1), hf_batch=1))
        elif key == "c":
            p = preset or "qwen3-0.6b"
            n, low, high, hf_batch = sizes.c
            reqs = range_workload(n, (low, high), (low, high), preset_spec(p).vocab_size, seed + 2)
            out.append(Workload("c", f"{p} {n} seqs, in/out U[{low},{high}]", p, reqs, hf_batch=hf_batch,
                                hf_batches_measured=hf_batches_c or None))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--preset", default=None, help="run every workload on this preset (e.g. tiny-llama)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--hf-batches-c", type=int, default=1,
                        help="transformers batches timed in (c) (scaled to all, marked ESTIMATED); 0 = all")
    parser.add_argument("--bandwidth-gbps", type=float, default=H100_COPY_GBPS)
    parser.add_argument("--matmul-tflops", type=float, default=H100_MATMUL_TFLOPS)
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after each timed tokenmill run, rerun it profiling 32 mid-run steps into DIR/<workload>")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    args.keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    unknown = sorted(set(args.keys) - {"a", "b", "c", "d"})
    if unknown:
        parser.error(f"--workloads takes a comma-separated subset of a,b,c,d; unknown: {','.join(unknown)}")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    ceilings = Ceilings(args.bandwidth_gbps, args.matmul_tflops)
    workloads = make_workloads(args.keys, sizes, args.preset, args.seed, args.hf_batches_c)
    sweep_preset = (args.preset or "llama3-8b") if "d" in args.keys else None
    presets = list(dict.fromkeys([wl.preset for wl in workloads] + ([sweep_preset] if sweep_preset else [])))
    rows: list[Row] = []
    sweep: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for preset in presets:
        mine = [wl for wl in workloads if wl.preset == preset]
        sweep += run_preset(preset, mine, preset == sweep_preset, args, sizes, ceilings, rows, failures)
        _free(args.device)  # the engine and the transformers model went out of scope with run_preset
        if args.device.startswith("cuda"):  # a leak here would shrink the next engine's KV cache
            print(f"[{preset}] released; {torch.cuda.memory_allocated() / 1e9:.1f} GB still allocated, "
                  f"{time.perf_counter() - started:.0f} s so far", flush=True)
    fill_floor_for_transformers(rows)
    print_table(workloads, rows, sweep, args)
    for failure in failures:
        print(f"FAILED ({failure['workload']}) {failure['engine']}: {failure['error']}")
    write_json(args, workloads, rows, sweep, failures, time.perf_counter() - started)
    return 1 if failures else 0


def run_preset(preset: str, mine: list[Workload], with_sweep: bool, args: argparse.Namespace, sizes: Sizes,
               ceilings: Ceilings, rows: list[Row], failures: list[dict[str, str]]) -> list[dict[str, Any]]:
    """transformers first (before tokenmill's KV cache takes the free memory), then tokenmill on its weights."""
    spec = preset_spec(preset)
    hf_model = None
    if not args.skip_transformers and mine:
        t0 = time.perf_counter()
        hf_model = build_hf_model(spec, getattr(torch, args.dtype), args.device, args.seed)
        print(f"[{preset}] transformers model built in {time.perf_counter() - t0:.1f} s", flush=True)
        hf_generate_batch(hf_model, fixed_workload(1, 8, 4, spec.vocab_size, 99), args.device)  # warm-up
        for wl in mine:
            row = _guarded(failures, wl.key, "transformers", args.device,
                           functools.partial(run_transformers, hf_model, wl, args.device))
            if row is not None:
                rows.append(row)
                print(f"[{wl.key}] transformers {row.tok_s:,.1f} tok/s", flush=True)
    need = [len(r.prompt_token_ids) + r.output_len for wl in mine for r in wl.requests]
    if with_sweep:
        need.append(max_sweep_len(sizes, args.max_num_batched_tokens))
    _free(args.device)
    if args.device.startswith("cuda"):  # transformers' peak would otherwise shrink tokenmill's KV cache
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = build_engine(preset, args, max(need) + 16, hf_model)
    hf_model = None  # tokenmill holds its own copy now
    _free(args.device)
    print(f"[{preset}] tokenmill engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    warm_len = (16, 4) if args.quick else (256, 8)  # prompts long enough to hit the prefill kernels
    warm_up_mixed_steps(engine, spec.vocab_size, *warm_len, temperature=0.0)  # greedy, like the timed runs
    for wl in mine:
        result = _guarded(failures, wl.key, "tokenmill", args.device,
                          functools.partial(tokenmill_row, engine, wl, ceilings, args.profile))
        if result is not None:
            rows.append(result[0])
            print(f"[{wl.key}] tokenmill {result[0].tok_s:,.1f} tok/s", flush=True)
    if not with_sweep:
        return []
    return _guarded(failures, "d", "tokenmill", args.device,
                    functools.partial(decode_sweep, engine, sizes, ceilings, args.seed)) or []


def _guarded(failures: list[dict[str, str]], workload: str, engine: str, device: str, fn: Any) -> Any:
    """Run one measurement; an out-of-memory or engine error is recorded and the run goes on (one GPU
    session should still report everything else)."""
    try:
        return fn()
    except (RuntimeError, ValueError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        failures.append({"workload": workload, "engine": engine, "error": f"{type(exc).__name__}: {exc}"[:500]})
        print(f"[{workload}] {engine} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        _free(device)
        return None


def fill_floor_for_transformers(rows: list[Row]) -> None:
    """The floor is a property of the workload: reuse tokenmill's per-step floor for transformers' row."""
    floors = {r.workload: r.floor_s for r in rows if r.engine == "tokenmill"}
    for r in rows:
        if r.engine == "transformers" and floors.get(r.workload) is not None:
            r.floor_s = floors[r.workload]


def print_table(workloads: list[Workload], rows: list[Row], sweep: list[dict[str, Any]],
                args: argparse.Namespace) -> None:
    hf = {r.workload: r for r in rows if r.engine == "transformers"}
    print(f"\n{device_name(args.device)} · {args.dtype} · {'QUICK (smoke test) ' if args.quick else ''}"
          f"ceilings {args.bandwidth_gbps:.0f} GB/s, {args.matmul_tflops:.0f} TFLOP/s")
    print(f"{'workload':<46}{'engine':<14}{'out tok/s':>12}{'× hf':>8}{'% floor':>9}{'% decode roof':>15}")
    titles = {wl.key: wl.title for wl in workloads}
    for r in sorted(rows, key=lambda r: (r.workload, r.engine != "transformers")):
        ratio = f"{r.tok_s / hf[r.workload].tok_s:.2f}" if r.workload in hf else "-"
        floor = f"{r.floor_pct:.1f}" if r.floor_pct is not None else "-"
        roof = f"{r.decode_roofline_pct:.1f}" if r.decode_roofline_pct is not None else "-"
        print(f"{'(' + r.workload + ') ' + titles[r.workload]:<46}{r.engine:<14}{r.tok_s:>12,.1f}{ratio:>8}"
              f"{floor:>9}{roof:>15}")
        for note in r.notes:
            print(f"{'':<48}{note}")
    if sweep:
        sizes = QUICK if args.quick else FULL
        print(f"\n(d) decode step vs bandwidth roofline ({args.preset or 'llama3-8b'}, {sizes.d_lens[0]}-token "
              f"prompts; median over steps where the whole batch decodes)")
        print(f"{'batch':>6}{'out len':>9}{'steps':>7}{'step ms':>10}{'roofline ms':>13}{'% roofline':>12}{'tok/s':>11}")
        for s in sweep:
            print(f"{s['batch']:>6}{s['output_len']:>9}{s['steps']:>7}{s['median_step_ms']:>10.2f}"
                  f"{s['roofline_ms']:>13.2f}{s['roofline_pct']:>12.1f}{s['tok_s']:>11,.0f}")
    print("floor = Σ over tokenmill's steps of max(FLOPs / matmul rate, bytes / bandwidth); transformers' "
          "% floor uses the same floor")


def write_json(args: argparse.Namespace, workloads: list[Workload], rows: list[Row], sweep: list[dict[str, Any]],
               failures: list[dict[str, str]], wall_s: float) -> None:
    record = {
        "benchmark": "gpu_vs_transformers",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "transformers": _transformers_version(),
        "config": {k: v for k, v in vars(args).items() if k != "keys"},
        "ceilings": {"bandwidth_gbps": args.bandwidth_gbps, "matmul_tflops": args.matmul_tflops},
        "workloads": {wl.key: {"title": wl.title, "preset": wl.preset, "num_requests": len(wl.requests),
                               "prompt_tokens": int(np.sum([len(r.prompt_token_ids) for r in wl.requests])),
                               "output_tokens": int(np.sum([r.output_len for r in wl.requests])),
                               "transformers_batch": wl.hf_batch} for wl in workloads},
        "rows": [{"workload": r.workload, "engine": r.engine, "output_tokens": r.output_tokens,
                  "elapsed_s": r.elapsed_s, "output_tok_s": r.tok_s, "floor_s": r.floor_s,
                  "floor_pct": r.floor_pct, "decode_roofline_pct": r.decode_roofline_pct,
                  "prefill_matmul_pct": r.prefill_matmul_pct, "profile": r.profile, "notes": r.notes}
                 for r in rows],
        "decode_sweep": sweep,
        "failures": failures,
        "wall_s": wall_s,
    }
    stem = "gpu_vs_transformers_quick" if args.quick else "gpu_vs_transformers"
    out = Path(args.out or Path(__file__).parent / "results" / f"{stem}_{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} (whole run {wall_s:.0f} s)")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
