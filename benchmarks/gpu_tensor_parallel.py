"""Tensor parallelism on one host's GPUs: throughput and decode against the roofline of N GPUs (issue 8).

For each (preset, tensor_parallel_size) in the run, on random weights of the preset's shape:
  (a) N × input → output offline throughput, floor = Σ per step max(FLOPs / (N × matmul rate), bytes / (N × bw));
  (b) batch-1 decode, input → output, against the N-GPU bandwidth roofline;
  (d) decode step time at several batch sizes against that roofline.
Ceilings are measured in the same run on the first GPU (device-to-device copy, bf16 8192³ matmul) and multiplied
by N: each rank reads 1/N of the weights and of the KV cache. Scaling efficiency compares batch-1 decode and
throughput of each size with the smallest size of the same preset: (tok/s ratio) / (GPU ratio).

Usage (nvidia-h200-x2): python benchmarks/gpu_tensor_parallel.py --runs llama3-70b:2,llama3-8b:1,llama3-8b:2
A run PRESET:TP:car uses the one-shot custom all-reduce (--custom-all-reduce) instead of NCCL for small tensors.
Smoke test (CPU, gloo): python benchmarks/gpu_tensor_parallel.py --runs tiny-llama:1,tiny-llama:2 --quick --device cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from gpu_vs_transformers import FULL, QUICK, Sizes, decode_sweep, make_workloads, max_sweep_len, tokenmill_row

from tokenmill.bench.roofline import Ceilings
from tokenmill.bench.throughput import device_name, warm_up_mixed_steps
from tokenmill.cuda_timing import median_event_ms
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.model.presets import preset_spec


def measure_ceilings(device: str) -> dict[str, float]:
    """One GPU's copy bandwidth (read + write counted) and bf16 matmul rate: medians of timed repeats."""
    if not device.startswith("cuda"):
        return {"bandwidth_gbps": 50.0, "matmul_tflops": 1.0}  # nominal: the CPU smoke test measures nothing
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)

    def timed(fn: Any, repeats: int = 10) -> float:
        fn()
        torch.cuda.synchronize()
        return median_event_ms(fn, repeats) / 1e3

    copy_s = timed(lambda: dst.copy_(src))
    matmul_s = timed(lambda: a @ b)
    return {"bandwidth_gbps": 2 * src.numel() / copy_s / 1e9, "matmul_tflops": 2 * 8192**3 / matmul_s / 1e12}


def build_engine(preset: str, tp: int, custom_all_reduce: bool, args: argparse.Namespace,
                 max_model_len: int) -> LLMEngine:
    return LLMEngine.from_kwargs(
        random_weights=preset, dtype=args.dtype, device=args.device, max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enforce_eager=args.enforce_eager, seed=args.seed, tensor_parallel_size=tp,
        custom_all_reduce=custom_all_reduce, stream_outputs=False,
    )


def run_one(preset: str, tp: int, custom_all_reduce: bool, args: argparse.Namespace, sizes: Sizes,
            gpu: dict[str, float]) -> dict[str, Any]:
    ceilings = Ceilings(tp * gpu["bandwidth_gbps"], tp * gpu["matmul_tflops"])
    workloads = make_workloads(["a", "b"], sizes, preset, args.seed, 0)
    sweep_sizes = Sizes(sizes.a, sizes.b, sizes.c, tuple(args.decode_batches), sizes.d_lens)
    need = max([len(r.prompt_token_ids) + r.output_len for wl in workloads for r in wl.requests]
               + [max_sweep_len(sweep_sizes, args.max_num_batched_tokens)])
    t0 = time.perf_counter()
    engine = build_engine(preset, tp, custom_all_reduce, args, need + 16)
    ready_s = time.perf_counter() - t0
    label = f"{preset} tp={tp}{' car' if custom_all_reduce else ''}"
    print(f"[{label}] engine ready in {ready_s:.1f} s", flush=True)
    try:
        warm = (16, 4) if args.quick else (256, 8)
        warm_up_mixed_steps(engine, preset_spec(preset).vocab_size, *warm, temperature=0.0)
        rows = {}
        for wl in workloads:
            row, _ = tokenmill_row(engine, wl, ceilings)
            rows[wl.key] = {"title": wl.title, "output_tok_s": row.tok_s, "elapsed_s": row.elapsed_s,
                            "floor_pct": row.floor_pct, "decode_roofline_pct": row.decode_roofline_pct,
                            "prefill_matmul_pct": row.prefill_matmul_pct, "notes": row.notes}
            print(f"[{label}] ({wl.key}) {wl.title}: {row.tok_s:,.1f} tok/s", flush=True)
        sweep = decode_sweep(engine, sweep_sizes, ceilings, args.seed)
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"preset": preset, "tensor_parallel_size": tp, "custom_all_reduce": custom_all_reduce,
            "engine_ready_s": ready_s,
            "ceilings": {"bandwidth_gbps": ceilings.bandwidth_gbps, "matmul_tflops": ceilings.matmul_tflops},
            "workloads": rows, "decode_sweep": sweep}


def scaling(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run against the smallest tensor_parallel_size of its preset: (tok/s ratio) / (GPU ratio)."""
    out = []
    for r in results:
        base = min((b for b in results if b["preset"] == r["preset"]),
                   key=lambda b: (b["tensor_parallel_size"], b["custom_all_reduce"]))
        if base is r:
            continue
        gpus = r["tensor_parallel_size"] / base["tensor_parallel_size"]
        entry = {"preset": r["preset"], "from_tp": base["tensor_parallel_size"], "to_tp": r["tensor_parallel_size"],
                 "custom_all_reduce": r["custom_all_reduce"]}
        for key in ("a", "b"):
            if key in r["workloads"] and key in base["workloads"]:
                speedup = r["workloads"][key]["output_tok_s"] / base["workloads"][key]["output_tok_s"]
                entry[f"{key}_speedup"] = speedup
                entry[f"{key}_efficiency"] = speedup / gpus
        out.append(entry)
    return out


def _tp_label(run: dict[str, Any]) -> str:
    return f"{run['tensor_parallel_size']}{'+car' if run['custom_all_reduce'] else ''}"


def print_table(results: list[dict[str, Any]], scale: list[dict[str, Any]], gpu: dict[str, float],
                device: str) -> None:
    print(f"\n{device_name(device)} · one GPU measured {gpu['bandwidth_gbps']:,.0f} GB/s copy, "
          f"{gpu['matmul_tflops']:,.0f} TFLOP/s bf16 matmul; ceilings below are N × these")
    print(f"{'preset':<14}{'TP':>6}  {'workload':<34}{'out tok/s':>12}{'% floor':>9}{'% decode roof':>15}")
    for r in results:
        for key, w in r["workloads"].items():
            floor = f"{w['floor_pct']:.1f}" if w["floor_pct"] is not None else "-"
            roof = f"{w['decode_roofline_pct']:.1f}" if w["decode_roofline_pct"] is not None else "-"
            print(f"{r['preset']:<14}{_tp_label(r):>6}  {'(' + key + ') ' + w['title']:<34}"
                  f"{w['output_tok_s']:>12,.1f}{floor:>9}{roof:>15}")
    print(f"\n{'preset':<14}{'TP':>6}{'batch':>7}{'step ms':>10}{'roofline ms':>13}{'% roofline':>12}{'tok/s':>11}")
    for r in results:
        for s in r["decode_sweep"]:
            print(f"{r['preset']:<14}{_tp_label(r):>6}{s['batch']:>7}{s['median_step_ms']:>10.2f}"
                  f"{s['roofline_ms']:>13.2f}{s['roofline_pct']:>12.1f}{s['tok_s']:>11,.0f}")
    for s in scale:
        parts = ", ".join(f"({k}) {s[k + '_speedup']:.2f}× = {100 * s[k + '_efficiency']:.0f}% efficiency"
                          for k in ("a", "b") if k + "_speedup" in s)
        car = " (custom all-reduce)" if s["custom_all_reduce"] else ""
        print(f"scaling {s['preset']} TP {s['from_tp']} → {s['to_tp']}{car}: {parts}")


def write_json(out: Path, args: argparse.Namespace, sizes: Sizes, gpu: dict[str, float],
               results: list[dict[str, Any]], failures: list[dict[str, Any]], wall_s: float) -> None:
    record = {
        "benchmark": "gpu_tensor_parallel",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": f"{torch.cuda.device_count()} × {device_name(args.device)}" if args.device.startswith("cuda")
        else device_name(args.device),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
        "config": {k: v for k, v in vars(args).items() if k != "run_list"},
        "one_gpu_ceilings": gpu,
        "sizes": {"a": sizes.a, "b": sizes.b, "d_lens": sizes.d_lens},
        "runs": results,
        "scaling": scaling(results),
        "failures": failures,
        "wall_s": wall_s,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def _parse_run(item: str) -> tuple[str, int, bool]:
    """PRESET:TP or PRESET:TP:car -> (preset, tensor_parallel_size, custom all-reduce)."""
    parts = item.strip().split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "car"):
        raise ValueError(f"bad run {item!r}")
    return parts[0], int(parts[1]), len(parts) == 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="llama3-70b:2", help="comma-separated PRESET:TP pairs, run in order")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--decode-batches", default="1,8,32,64,128,256")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    try:
        args.run_list = [_parse_run(item) for item in args.runs.split(",")]
        args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    except ValueError:
        parser.error("--runs takes PRESET:TP or PRESET:TP:car items (e.g. llama3-70b:2) and --decode-batches "
                     "integers")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    gpu = measure_ceilings(args.device)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the ceilings' buffers would shrink the first engine's KV cache
    print(f"one GPU: {gpu['bandwidth_gbps']:,.0f} GB/s copy, {gpu['matmul_tflops']:,.0f} TFLOP/s", flush=True)
    results: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    stem = "gpu_tensor_parallel_quick" if args.quick else "gpu_tensor_parallel"
    out = Path(args.out or Path(__file__).parent / "results" / f"{stem}_{dt.date.today().isoformat()}.json")
    for preset, tp, custom_all_reduce in args.run_list:
        try:
            results.append(run_one(preset, tp, custom_all_reduce, args, sizes, gpu))
        except (RuntimeError, ValueError) as exc:  # out of memory, a failed rank: record it, run the rest
            failures.append({"preset": preset, "tensor_parallel_size": tp, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(f"[{preset} tp={tp}] FAILED: {failures[-1]['error']}", flush=True)
        write_json(out, args, sizes, gpu, results, failures, time.perf_counter() - started)  # after each run
    print_table(results, scaling(results), gpu, args.device)
    print(f"wrote {out} (whole run {time.perf_counter() - started:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
