"""Issue 22's max load on an H100: 1024 requests of 128 -> 128 tokens handed over at once (TensorRT-LLM's
perf-overview shape; TRT-LLM FP8: 28,312 output tok/s), Llama-3-8B shape, random weights, bf16 and FP8 weights + FP8
KV cache, at several (max_num_seqs, max_cudagraph_capture_size, max_num_batched_tokens) settings.

The floor on paper (``tokenmill.bench.roofline.wave_floor``: the requests in waves of max_num_seqs; weights 16.06 GB
in bf16, 8.03 GB in FP8; KV 131 KB per token in bf16, 65.5 KB in FP8; ~15.0 GFLOP per token with the LM head):

  prefill: 1024 x 128 tokens x 14.0 GFLOP = 1.83 PFLOP -> 2.29 s at 800 TFLOP/s (bf16), 1.31 s at 1400 (FP8), at any
           batch (compute-bound; attention FLOPs < 0.3%).
  decode:  1024 x 127 steps of one token. Per step at batch B: FLOPs B x 15.0 G; bytes all weights + the batch's KV
           (context 128..254). The KV read over the whole run is the same at any B (3.3 TB in bf16: 1.09 s at
           3.0 TB/s), but the weights are read once per step, 1024 / B x 127 times (bf16: 2.72 s at B 256, 0.68 s at
           B 1024).

  floor: each step at max(FLOPs / matmul rate, bytes / copy rate). serial: the matmuls at max(FLOPs, weight bytes),
  then attention at its KV bytes (kernels run one after another, so the KV read does not hide under the matmuls).

  | batch | bf16 decode step: floor / serial | bf16 tok/s: floor / serial | FP8 step: floor / serial | FP8 tok/s: floor / serial |
  |---|---|---|---|---|
  | 256  |  7.50 /  7.50 ms | 21,472 / 21,451 |  3.75 /  3.84 ms | 40,755 / 40,172 |
  | 512  | 10.01 / 13.97 ms | 27,101 / 22,417 |  5.53 /  7.67 ms | 48,286 / 40,172 |
  | 1024 | 19.34 / 27.93 ms | 27,592 / 22,417 | 11.05 / 15.35 ms | 48,286 / 40,172 |

(3.0 TB/s copy; 800 TFLOP/s bf16 and 1400 FP8 at 8192^3; FP8 counts the LM head at the FP8 rate: optimistic.) At 256
rows the matmuls sit at the ridge (bf16: 4.8 ms of FLOPs vs 5.35 ms of weights), so on paper a larger batch buys
little once kernels serialize (bf16 +4.5%). What it buys in practice is matmul efficiency: the last run's GEMMs
(benchmarks/results/gpu_fp8_h100_2026-12-06.json, Llama-3-8B's four projections per layer) cost 25.5 us per token at
256 rows and 17.6 at 1024 in bf16 (440-583 vs 760-819 TFLOP/s), 18.7 and 12.6 us in FP8 W8A8; and the per-step
costs (LM head launch, sampling, host) are paid 4x less often. From those GEMMs, FP8 KV attention at 76% of the copy
rate and ~1 ms of norms/RoPE/activations, a 1024-row decode step should take ~21 ms in FP8 (~2.7 s of decode) and
~30 ms in bf16 (~3.9 s); with the last run's prefill (FP8 2.06 s at 64% of the FP8 matmul rate, bf16 2.85 s at 83%),
~27,700 and ~19,500 tok/s. The targets: bf16 18,000 (65% of the 1024 floor, 80% of serial); FP8 30,000 (62% / 75%),
which also needs the FP8 prefill nearer its matmul rate. The last run at 256 rows: bf16 15,287, FP8 W+KV 20,100.

Each run builds the engine (one per setting: graph capture and KV sizing depend on it), warms it (mixed steps, then
max_num_seqs short requests: decode at the full batch), freezes the start-up heap (as ``bench throughput``), and
times the workload. It reports output tok/s, % of the measured steps' floor and of the setting's wave floor, the mean
decode step and batch, the GPU's busy share and idle gaps (benchmarks/step_breakdown.py's CUDA events: > 0 means the
GPU waited for the host), the host's per-phase time of a decode step, full collections, and JIT compiles.

    python3 benchmarks/gpu_maxload.py --out $OUT/gpu_maxload.json           # H100, < 250 s
    python3 benchmarks/gpu_maxload.py --dry-run --device cpu --preset tiny-llama --out /tmp/maxload.json  # plumbing
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_record import write_record  # noqa: E402
from step_breakdown import StepBreakdown  # noqa: E402

from tokenmill.bench.roofline import Ceilings, summarize, wave_floor  # noqa: E402
from tokenmill.bench.throughput import run_offline, warm_up, warm_up_mixed_steps  # noqa: E402
from tokenmill.bench.workloads import fixed_workload  # noqa: E402
from tokenmill.engine.gc_heap import CollectionTimer, freeze_startup_heap, unfreeze_heap  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402

FP8_W_KV = {"quantization": "fp8", "kv_cache_dtype": "fp8"}
VARIANTS = {
    "fp8_w_kv": FP8_W_KV,  # RMSNorm / SiLU-and-mul write FP8 for the next linear (vLLM's fuse_*_quant, default on)
    "bf16": {},
    # the A/B of those fusions: the separate per-token quantization kernel before every W8A8 linear
    "fp8_w_kv_unfused": {**FP8_W_KV, "compilation_config": {"pass_config": {"fuse_norm_quant": False,
                                                                           "fuse_act_quant": False}}},
    "fp8_w_kv_lmhead": {**FP8_W_KV, "quantize_lm_head": True},  # the LM head in FP8 too (opt-in)
}
DEFAULT_VARIANTS = "fp8_w_kv,bf16"
# (max_num_seqs, max_cudagraph_capture_size, max_num_batched_tokens), in the order they run (the budget may cut the
# tail): the full batch with graphs for it, the last run's setting, a larger prefill budget, half the batch, and the
# full batch with vLLM's default graph cap (decode steps past 512 rows run eagerly).
SETTINGS = "1024:1024:8192,256:256:8192,1024:1024:16384,512:512:8192,1024:512:8192"
DRY_SETTINGS = "32:32:256,8:8:256"
H100_FP8_TFLOPS = 1400.0  # paper figure when the ceilings are not measured (the last run measured 1418)


def parse_settings(text: str) -> list[tuple[int, int, int]]:
    settings = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--settings wants SEQS:GRAPHS:TOKENS items; got {item!r}")
        settings.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return settings


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measured_ceilings() -> dict[str, float]:
    from gpu_fp8 import ceilings

    return ceilings()


def decode_stats(result: Any) -> dict[str, float]:
    """Mean time and batch of the decode-only steps (every row one token), and the steps with prompt tokens."""
    decode = [(s, t) for s, t in zip(result.steps, result.step_times_s, strict=True) if s.is_decode]
    prompt = [t for s, t in zip(result.steps, result.step_times_s, strict=True) if not s.is_decode]
    return {
        "num_decode_steps": len(decode),
        "mean_decode_step_ms": 1e3 * statistics.fmean(t for _, t in decode) if decode else 0.0,
        "median_decode_step_ms": 1e3 * statistics.median(t for _, t in decode) if decode else 0.0,
        "mean_decode_batch": statistics.fmean(len(s.new) for s, _ in decode) if decode else 0.0,
        "num_prompt_steps": len(prompt),
        "prompt_steps_s": sum(prompt),
    }


def one_run(args: argparse.Namespace, variant: str, setting: tuple[int, int, int], ceils: dict[str, float],
            workload: tuple[int, int, int]) -> dict[str, Any]:
    seqs, graph_cap, tokens = setting
    num, input_len, output_len = workload
    left_over = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    t0 = time.perf_counter()
    engine = LLMEngine.from_kwargs(
        random_weights=args.preset, dtype="bfloat16" if args.device.startswith("cuda") else "float32",
        device=args.device, max_model_len=args.max_model_len, max_num_seqs=seqs, max_cudagraph_capture_size=graph_cap,
        max_num_batched_tokens=tokens, stream_outputs=False, **VARIANTS[variant])
    build_s = time.perf_counter() - t0
    spec = engine.model.spec
    row: dict[str, Any] = {"variant": variant, "max_num_seqs": seqs, "max_cudagraph_capture_size": graph_cap,
                           "max_num_batched_tokens": tokens, "build_s": build_s,
                           "kv_cache_tokens": engine.num_kv_cache_tokens, "allocated_before_build_bytes": left_over}
    print(f"[{variant} {seqs}/{graph_cap}/{tokens}] ready in {build_s:.1f} s, KV {engine.num_kv_cache_tokens:,} tokens",
          flush=True)
    requests = fixed_workload(num, input_len, output_len, spec.vocab_size, seed=num + input_len)
    freeze_startup_heap()  # full collections during the run skip the start-up heap (bench throughput does too)
    try:
        t0 = time.perf_counter()
        warm_up_mixed_steps(engine, spec.vocab_size, min(256, input_len), 8, temperature=0.0)
        # Decode at the full batch (short prompts: the mixed steps above compiled the workload's prompt shapes).
        warm_up(engine, min(seqs, num), spec.vocab_size, min(16, input_len), 4, temperature=0.0)
        row["warm_up_s"] = time.perf_counter() - t0
        breakdown = StepBreakdown(engine)
        with CollectionTimer() as collections:
            result = run_offline(engine, requests, ignore_eos=True, temperature=0.0, id_prefix="maxload-")
        steps = breakdown.summary(result.elapsed_s)
        breakdown.remove()
    finally:
        unfreeze_heap()
    fp8 = variant.startswith("fp8")
    dtype_bytes = 1 if fp8 else 2  # FP8 W+KV: one byte per weight and KV element
    ceilings = Ceilings(ceils.get("copy_gbps", 3000.0),
                        ceils.get("fp8_matmul_tflops", H100_FP8_TFLOPS) if fp8 else ceils.get("bf16_matmul_tflops", 800.0))
    roof = summarize(spec, result.steps, result.step_times_s, ceilings, dtype_bytes)
    paper = wave_floor(spec, num, input_len, output_len, seqs, tokens, ceilings, dtype_bytes)
    row.update({
        "output_tok_s": result.output_tok_s, "elapsed_s": result.elapsed_s, "output_tokens": result.output_tokens,
        "num_steps": len(result.steps), **decode_stats(result),
        "floor_pct_of_steps": roof.floor_pct, "roofline": roof.to_dict(),
        "wave_floor": paper.to_dict(), "pct_of_wave_floor": 100.0 * result.output_tok_s / paper.output_tok_s,
        "gpu": steps.get("gpu"), "host_decode_step_ms": steps.get("decode_steps", {}).get("median_ms"),
        "full_collections_ms": collections.pauses_ms, "jit_compiles": result.jit_compiles,
    })
    gpu = steps.get("gpu") or {}
    print(f"[{variant} {seqs}/{graph_cap}/{tokens}] {result.output_tok_s:,.0f} output tok/s in {result.elapsed_s:.2f} s "
          f"({roof.floor_pct:.0f}% of its steps' floor, {row['pct_of_wave_floor']:.0f}% of the wave floor "
          f"{paper.output_tok_s:,.0f}); decode {row['mean_decode_step_ms']:.2f} ms x {row['num_decode_steps']} at "
          f"batch {row['mean_decode_batch']:.0f}; GPU busy {100 * (gpu.get('busy_share_of_wall') or 0):.0f}%, idle "
          f"gaps {gpu.get('idle_gaps_ms_total', 0):.0f} ms; {len(collections.pauses_ms)} full collections, "
          f"{len(result.jit_compiles)} JIT compiles", flush=True)
    del engine
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"known: {', '.join(VARIANTS)}")
    parser.add_argument("--settings", default=None, help=f"SEQS:GRAPHS:TOKENS,... (default {SETTINGS})")
    parser.add_argument("--workload", default="1024:128:128", help="REQUESTS:INPUT:OUTPUT")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--budget-s", type=float, default=175.0,
                        help="start no run after this many seconds (each takes ~20-30 s on an H100)")
    parser.add_argument("--dry-run", action="store_true",
                        help=f"tiny workload (64:16:16) and settings ({DRY_SETTINGS}): plumbing only, CPU works")
    args = parser.parse_args()
    start = time.perf_counter()
    settings = parse_settings(args.settings or (DRY_SETTINGS if args.dry_run else SETTINGS))
    workload = tuple(int(x) for x in ("64:16:16" if args.dry_run else args.workload).split(":"))
    if args.dry_run:
        args.max_model_len = min(args.max_model_len, 64)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    record: dict[str, Any] = {"workload": dict(zip(("requests", "input_len", "output_len"), workload, strict=True)),
                              "runs": [], "failures": []}
    ceils: dict[str, float] = {}
    if args.device.startswith("cuda"):
        try:
            ceils = measured_ceilings()
        except Exception as exc:  # the runs still have the paper ceilings
            traceback.print_exc()
            record["failures"].append({"section": "ceilings", "error": f"{type(exc).__name__}: {exc}"})
    record["ceilings"] = ceils
    print(f"[ceilings] {ceils}", flush=True)
    for setting in settings:
        for variant in variants:
            if time.perf_counter() - start > args.budget_s:
                record["runs"].append({"variant": variant, "setting": list(setting), "skipped": "time budget spent"})
                continue
            free()
            try:
                record["runs"].append(one_run(args, variant, setting, ceils, workload))
            except Exception as exc:  # one failed run must not lose the others' figures
                traceback.print_exc()
                record["failures"].append({"variant": variant, "setting": list(setting),
                                           "error": f"{type(exc).__name__}: {exc}"})
            free()
    record["wall_s"] = time.perf_counter() - start
    path = write_record(Path(args.out), "gpu_maxload", **record)
    print(f"\n{'variant':>9} {'seqs/graphs/tokens':>19} {'tok/s':>8} {'% floor':>8} {'decode ms':>9} {'GPU busy':>8}")
    for run in record["runs"]:
        if "output_tok_s" not in run:
            continue
        busy = (run["gpu"] or {}).get("busy_share_of_wall") or 0.0
        print(f"{run['variant']:>9} {run['max_num_seqs']:>7}/{run['max_cudagraph_capture_size']}/"
              f"{run['max_num_batched_tokens']:<6} {run['output_tok_s']:>8,.0f} {run['pct_of_wave_floor']:>7.0f}% "
              f"{run['mean_decode_step_ms']:>9.2f} {100 * busy:>7.0f}%")
    print(f"wrote {path} in {record['wall_s']:.0f} s")
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
