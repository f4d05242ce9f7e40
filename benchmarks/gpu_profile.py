"""Where the GPU time goes: linear-layer bandwidth at decode batch sizes, and profiled engine runs.

Part 1 times ``F.linear`` (cuBLAS) on the Llama-3-8B / Qwen3-0.6B projection shapes at M = 1..256 tokens and
reports the achieved weight-read bandwidth (the ceiling our decode steps can reach with these GEMMs).
Part 2 runs ``bench throughput`` with ``--profile`` on the issue-4 workloads and prints the torch profiler's
GPU time by kernel category (gemm, attention, norm/rope/act, sampling, copy) and the idle rest (launch gaps,
Python, syncs). Results and traces go under --out.

    python benchmarks/gpu_profile.py --out $OUT/profile      # H100, ~4 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# (name, in_features, out_features) per model shape
SHAPES = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
                  ("lm_head", 4096, 128256)],
    "qwen3-0.6b": [("qkv", 1024, 4096), ("o", 2048, 1024), ("gate_up", 1024, 6144), ("down", 3072, 1024),
                   ("lm_head", 1024, 151936)],
}

# name -> bench throughput argv (profile window in decode-heavy steps)
RUNS = {
    "b_batch1": ["--random-weights", "llama3-8b", "--num-prompts", "1", "--input-len", "128", "--output-len", "256",
                 "--profile-start", "100", "--profile-steps", "32"],
    "d_batch64": ["--random-weights", "llama3-8b", "--num-prompts", "64", "--input-len", "512", "--output-len", "64",
                  "--profile-start", "30", "--profile-steps", "16"],
    "d_batch256": ["--random-weights", "llama3-8b", "--num-prompts", "256", "--input-len", "512", "--output-len", "64",
                   "--profile-start", "40", "--profile-steps", "16"],
    "c_qwen": ["--random-weights", "qwen3-0.6b", "--num-prompts", "256", "--input-len-range", "100:1024",
               "--output-len-range", "100:1024", "--profile-start", "300", "--profile-steps", "16"],
    "a_prefill": ["--random-weights", "llama3-8b", "--num-prompts", "128", "--input-len", "512", "--output-len", "128",
                  "--profile-start", "0", "--profile-steps", "8"],
}


def linear_bandwidth(rep_ms: int = 50) -> list[dict[str, Any]]:
    """cuBLAS (torch's default cuBLASLt, and legacy cuBLAS) vs each GEMV / tiled-GEMM config per shape and M.

    Timed like the start-up tuning (runner/linear_tuning.py): triton's do_bench flushes L2 between calls,
    so the weights come from HBM as they do in a decode step.
    """
    from triton.testing import do_bench

    from tokenmill.kernels.decode_linear import candidates_for, decode_linear

    def bench(fn: Any) -> float:
        return do_bench(fn, warmup=10, rep=rep_ms)

    rows = []
    for model, shapes in SHAPES.items():
        for name, k, n in shapes:
            weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            for m in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                variants: dict[str, float] = {"cublaslt": bench(lambda x=x, weight=weight: F.linear(x, weight))}
                try:
                    torch.backends.cuda.preferred_blas_library("cublas")
                    variants["cublas"] = bench(lambda x=x, weight=weight: F.linear(x, weight))
                finally:
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                for c in candidates_for(m):  # the GEMV (1-2 rows) and the tiled GEMM configs
                    variants[c.name if c.name.startswith("gemv") else f"tiled_{c.name}"] = bench(
                        lambda x=x, weight=weight, c=c: decode_linear(x, weight, None, c))
                nbytes = 2 * (n * k + m * k + m * n)
                for variant, ms in variants.items():
                    rows.append({"model": model, "layer": name, "m": m, "k": k, "n": n, "variant": variant,
                                 "ms": ms, "gbps": nbytes / ms / 1e6, "tflops": 2 * m * n * k / ms / 1e9})
            del weight
    return rows


def linear_tunableop(rep_ms: int = 50) -> dict[str, Any]:
    """cuBLAS's default choice vs PyTorch TunableOp (which times the BLAS libraries' candidate algorithms)
    for the Llama-3-8B projections at 64-256 rows, where the default runs below the copy rate."""
    from triton.testing import do_bench

    rows = []
    for name, k, n in SHAPES["llama3-8b"]:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (64, 128, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            default = do_bench(lambda x=x, weight=weight: F.linear(x, weight), warmup=10, rep=rep_ms)
            torch.cuda.tunable.enable(True)
            torch.cuda.tunable.tuning_enable(True)
            try:
                F.linear(x, weight)  # tunes this shape once
                torch.cuda.synchronize()
                torch.cuda.tunable.tuning_enable(False)
                tuned = do_bench(lambda x=x, weight=weight: F.linear(x, weight), warmup=10, rep=rep_ms)
            finally:
                torch.cuda.tunable.enable(False)
            rows.append({"layer": name, "m": m, "k": k, "n": n, "default_ms": default, "tunableop_ms": tuned,
                         "ratio": tuned / default})
            print(f"tunableop llama3-8b {name:<8} m={m:<4} default {1e3 * default:7.1f} us  "
                  f"tunableop {1e3 * tuned:7.1f} us  ({tuned / default:.2f}x)", flush=True)
        del weight
    return {"timings": rows, "chosen": [list(map(str, r)) for r in torch.cuda.tunable.get_results()]}


def gpu_gaps(trace_path: Path, top: int = 12) -> dict[str, Any]:
    """Idle time on the GPU between consecutive device events of a chrome trace, by (before, after) pair.

    Shows where a step's wall time is not kernel time: graph-launch latency, input copies, host waits.
    """
    events = json.loads(trace_path.read_text())["traceEvents"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                    key=lambda e: e["ts"])
    pairs: dict[tuple[str, str], list[float]] = {}
    end, last = 0.0, None  # the latest end so far and its event: events on other streams may overlap
    for event in device:
        if last is not None and event["ts"] > end:
            pairs.setdefault((last["name"][:60], event["name"][:60]), []).append(event["ts"] - end)
        if last is None or event["ts"] + event["dur"] > end:
            end, last = event["ts"] + event["dur"], event
    span = end - device[0]["ts"] if device else 0.0
    idle = sum(sum(g) for g in pairs.values())
    ranked = sorted(pairs.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"span_us": span, "busy_us": span - idle, "idle_us": idle, "events": len(device),
            "top_gaps": [{"before": b, "after": a, "count": len(g), "total_us": sum(g), "max_us": max(g)}
                         for (b, a), g in ranked]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ",".join(RUNS))
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--linear-only", action="store_true")
    parser.add_argument("--tunableop", action="store_true", help="also time PyTorch TunableOp's GEMM choice")
    parser.add_argument("--gaps", action="store_true", help="also list the GPU idle gaps of each run's trace")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "benchmark": "gpu_profile", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(), "command": shlex.join(["python", *sys.argv]),
        "torch": torch.__version__,
    }
    if not args.skip_linear:
        record["linear"] = linear_bandwidth()
        print(f"{'model':<11} {'layer':<8} {'m':>4} {'variant':<28} {'us':>8} {'GB/s':>7} {'TFLOP/s':>8}")
        for r in record["linear"]:
            print(f"{r['model']:<11} {r['layer']:<8} {r['m']:>4} {r['variant']:<28} {1e3 * r['ms']:8.1f} "
                  f"{r['gbps']:7.0f} {r['tflops']:8.1f}")
    if args.tunableop:
        record["tunableop"] = linear_tunableop()
    record["runs"] = {}
    for name in ([] if args.linear_only else args.runs.split(",")):
        argv = [*RUNS[name], "--ignore-eos", "--warmup-requests", "4", "--profile", str(out / name),
                "--output-json", str(out / f"{name}.json")]
        print(f"\n=== {name}: bench throughput {shlex.join(argv)}", flush=True)
        # One process per engine: an engine sizes its KV cache from the free memory, which a previous
        # engine in the same process would still hold.
        code = ("import sys, argparse; from tokenmill.bench import throughput as t; p = argparse.ArgumentParser(); "
                "t.add_arguments(p); sys.exit(t.run(p.parse_args(sys.argv[1:])))")
        rc = subprocess.run([sys.executable, "-c", code, *argv], check=False).returncode
        record["runs"][name] = {"argv": argv, "rc": rc}
        if args.gaps and (out / name / "trace.json").exists():
            gaps = record["runs"][name]["gaps"] = gpu_gaps(out / name / "trace.json")
            print(f"{name}: GPU span {gaps['span_us'] / 1e3:.2f} ms, busy {gaps['busy_us'] / 1e3:.2f} ms, "
                  f"idle {gaps['idle_us'] / 1e3:.2f} ms over {gaps['events']} device events; largest idle by pair:")
            for g in gaps["top_gaps"]:
                print(f"  {g['total_us']:9.1f} us  x{g['count']:<5} max {g['max_us']:7.1f}  {g['before']}  ->  {g['after']}")
    (out / "gpu_profile.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
