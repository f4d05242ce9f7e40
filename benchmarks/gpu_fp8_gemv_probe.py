"""Probe of the FP8-weight GEMV variants (kernels/fp8_stream.py) on Llama-3-8B's projections (qkv 6144x4096,
o 4096x4096, gate_up 28672x4096, down 4096x14336; e4m3, one scale per output channel) at 1, 2, 4, 8 and 16 rows,
against cuBLAS bf16 and today's FP8 GEMV (kernels/fp8_gemv.py as kernels/quant_dispatch.py picks it; on a GPU its
shipped table does not list, e.g. an H200, the H100's entry), all in one run: issue 22 wants batch-1 FP8 decode
>= 1.8x bf16, so the GEMV must stream at >= ~90% of the copy bandwidth.

Every variant is first checked against the fp32 product of x and the dequantized weight on fresh random inputs
(one that fails to compile or to match is recorded and not timed; the probe goes on). Timing as
benchmarks/gpu_quant_gemv_sweep.py: one CUDA graph runs the projection once per weight copy over 32 copies (never
served from L2), replays timed with CUDA events, median; µs per call. ``pct_of_copy`` is the weight bytes
(+ scales) over the device-to-device copy rate measured in the same run (read + write counted, as
/work/shared/GPU_NOTES.md's 3.0 TB/s), divided by the time: 100% = streaming the weight at the copy rate.

    OUT=$OUT python3 benchmarks/gpu_fp8_gemv_probe.py --time-limit 140      # H100, < 150 s in all
    python3 benchmarks/gpu_fp8_gemv_probe.py --sass                          # no GPU: sm_90 registers / SASS a weight
    TRITON_INTERPRET=1 python3 benchmarks/gpu_fp8_gemv_probe.py --cpu-dry-run --out /tmp/p.json   # tiny shapes

It writes the JSON (every measurement, failures, the four projections added up per row count) and a .txt table
beside it; ``--configs-out FILE`` writes kernels/quant_dispatch.py's table with this device's FP8 entries replaced
by the fastest kernel per (shape, row count) measured here (the shipped table otherwise kept as it is).
Rows run in the order 1, 16, 4, 8, 2 so that a cut loses the least needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

START = time.monotonic()

from collections.abc import Callable  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_probe import GemvProbe, best_per_case, finish_rows, table_lines, tag  # noqa: E402
from gpu_record import write_record  # noqa: E402

from tokenmill.kernels._triton import next_power_of_2  # noqa: E402
from tokenmill.kernels.fp8_gemv import fp8_gemv  # noqa: E402
from tokenmill.kernels.fp8_quant import quantize_fp8  # noqa: E402
from tokenmill.kernels.fp8_stream import Fp8StreamConfig, fp8_stream_gemv  # noqa: E402
from tokenmill.kernels.quant_dispatch import (  # noqa: E402
    SHIPPED_CONFIGS,
    config_from_json,
    default_fp8_config,
    tuned_choice,
)
from tokenmill.kernels.splitk import SplitKConfig  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TINY_SHAPES = {"qkv": (96, 256), "o": (64, 256), "gate_up": (160, 256), "down": (64, 512)}  # --cpu-dry-run
ROWS = (1, 16, 4, 8, 2)
COPIES = 32
H100 = "NVIDIA H100 80GB HBM3"  # the device the shipped table was measured on


def fma(n: int, p: int, w: int = 4, pf: bool = False, asm: bool = True, pdl: bool = True) -> Fp8StreamConfig:
    return Fp8StreamConfig("fma", block_n=n, pairs=p, num_warps=w, prefetch=pf, asm=asm, pdl=pdl)


def mma(n: int, k: int, s: int, w: int = 4, st: int = 3) -> Fp8StreamConfig:
    return Fp8StreamConfig("mma", block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=st)


# Chosen from sm_90 compiles without a GPU (``--sass``; triton 3.6, the device's, and 3.9 give the same counts): the
# fma kind's K loop costs 2.9-3.3 SASS instructions a weight at 1 row (today's 1-row kernel 6.0, with a
# shared-memory round trip a step), 4.1-4.5 at 2 rows, 6.4-7.4 at 4 (one FFMA a row-weight), 12-15 at 8 (past the
# issue budget: the mma kind there); the mma kind 2.7-3.4 at any row count (today's 2-16 row kind 4.7, one F2F a
# weight on the slow conversion pipe).
def candidates(rows: int) -> list[Fp8StreamConfig]:
    """A few configs a row count; each distinct one costs a Triton compile (~1-3 s on the device)."""
    tensor = [mma(64, 128, 4), mma(64, 128, 8), mma(128, 128, 4, w=8), mma(64, 256, 4), mma(64, 128, 4, st=4)]
    by_rows = {
        1: [fma(8, 128), fma(16, 128), fma(8, 256, w=8), fma(16, 64, w=2), fma(8, 128, pf=True), fma(4, 128, pf=True),
            fma(8, 128, pdl=False), fma(8, 128, asm=False), mma(64, 128, 8)],
        2: [fma(8, 128), fma(8, 128, pf=True), fma(4, 128), mma(64, 128, 4), mma(64, 128, 8)],
        4: [fma(4, 128), fma(8, 128), fma(4, 128, pf=True), mma(64, 128, 4), mma(64, 128, 8), mma(128, 128, 4, w=8)],
    }
    return by_rows.get(rows, tensor)


def today_config(device: torch.device, n: int, k: int, rows: int) -> SplitKConfig | None:
    """Today's FP8 GEMV config: the shipped table's entry for this device, else the H100's, else the default."""
    found, config = tuned_choice(device, "fp8", n, k, rows)
    if not found:
        buckets = json.loads(SHIPPED_CONFIGS.read_text()).get(H100, {}).get("fp8", {}).get(f"{n}x{k}", {})
        bucket = min((int(r) for r in buckets if int(r) >= rows), default=None)
        found, config = bucket is not None, config_from_json(buckets[str(bucket)]) if bucket is not None else None
    return config if found else default_fp8_config(rows, n, k)


def cuda_graph_us(fn: Callable[[], Any], repeats: int = 15) -> float:
    """Median µs of one replay of a CUDA graph of ``fn`` (one call per weight copy), divided by the copies."""
    from gpu_pdl_probe import time_graph

    return time_graph(fn, repeats) / COPIES


def cpu_us(fn: Callable[[], Any], repeats: int = 2) -> float:
    """The dry run's stand-in for the timer (interpreter wall time: exercises the code path, means nothing)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[len(times) // 2] / COPIES


def copy_rate_gbps(device: torch.device) -> float:
    """Device-to-device copy rate, read + write counted (GB/s)."""
    if device.type != "cuda":
        return float("nan")
    from tokenmill.cuda_timing import median_event_ms

    src = torch.randn(256 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_event_ms(lambda: dst.copy_(src), 20) / 1e6


class Weights:
    """One shape's operands: COPIES bf16 weights and their e4m3 quantizations (one scale per channel)."""

    def __init__(self, n: int, k: int, copies: int, device: torch.device, gen: torch.Generator) -> None:
        self.n, self.k = n, k
        self.dense = [(torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                      for _ in range(copies)]
        self.fp8 = [(q, s.view(-1)) for q, s in (quantize_fp8(d, dim=1) for d in self.dense)]
        q0, s0 = self.fp8[0]
        self.dequant_t = (q0.float() * s0[:, None]).t()  # fp32 [K, N], the reference's weight
        self.fp8_bytes = q0.nbytes + s0.nbytes


def write(pr: GemvProbe) -> None:
    finish_rows(pr.results)
    write_record(pr.out, "gpu_fp8_gemv_probe", copy_rate_gbps=pr.copy_rate, copies=COPIES, results=pr.results,
                 best=best_per_case(pr.results, list(SHAPES)), decode_totals=decode_totals(pr.results),
                 suggested_table={"fp8": suggested_entries(pr.results)}, failures=pr.failures, skipped=pr.skipped,
                 fatal=pr.fatal, wall_s=time.monotonic() - START)


def lines(pr: GemvProbe, top: int | None = None) -> list[str]:
    return table_lines(pr.results, list(SHAPES), "pct_of_copy", "%copy", top) + summary_lines(pr)


def probe_case(pr: GemvProbe, shape: str, w: Weights, rows: int, gen: torch.Generator) -> None:
    device = w.dense[0].device
    x = torch.randn(rows, w.k, device=device, generator=gen).to(torch.bfloat16)
    ref = x.float() @ w.dequant_t
    case = {"shape": shape, "rows": rows, "n": w.n, "k": w.k, "bytes": w.fp8_bytes}
    pr.measure({**case, "bytes": w.dense[0].nbytes}, "bf16:cublas", {"kernel": "cublas"},
               lambda: F.linear(x, w.dense[0]), lambda: [F.linear(x, d) for d in w.dense], None)
    today = today_config(device, w.n, w.k, rows)
    if today is not None:
        pr.measure(case, f"today:{today.name}", {"kernel": "splitk", **asdict(today)},
                   lambda: fp8_gemv(x, *w.fp8[0], None, today),
                   lambda: [fp8_gemv(x, q, s, None, today) for q, s in w.fp8], ref)
    for config in candidates(rows):
        pr.measure(case, config.name, {"kernel": "fp8_stream", **asdict(config)},
                   lambda c=config: fp8_stream_gemv(x, *w.fp8[0], c),
                   lambda c=config: [fp8_stream_gemv(x, q, s, c) for q, s in w.fp8], ref)
    print(f"{shape} rows={rows} done at {time.monotonic() - START:.0f} s", flush=True)


def decode_totals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four projections added up per row count: bf16, today's kernel, the best new variant per shape, and the
    best of today's and the new (what the dispatch table would serve), with the summed % of the copy rate."""
    by: dict[tuple, dict[str, Any]] = {}
    for r in results:
        for label in {tag(r), "served"} - ({"served"} if tag(r) == "bf16" else set()):
            key = (r["rows"], label, r["shape"])
            if key not in by or r["us"] < by[key]["us"]:
                by[key] = r
    totals = []
    shapes = sorted({r["shape"] for r in results})
    for rows in sorted({r["rows"] for r in results}):
        row: dict[str, Any] = {"rows": rows}
        for label in ("bf16", "today", "new", "served"):
            picked = [by.get((rows, label, s)) for s in shapes]
            us = sum(p["us"] for p in picked) if all(picked) else float("nan")
            row[f"{label}_us"] = us
            if all(picked):
                row[f"{label}_pct_of_copy"] = sum(p["us"] * p["pct_of_copy"] for p in picked) / us
        for label in ("today", "new", "served"):
            row[f"{label}_x_bf16"] = row["bf16_us"] / row[f"{label}_us"]
        totals.append(row)
    return totals


def suggested_entries(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kernels/quant_dispatch.py table entries ({"NxK": {rows: entry}}): the fastest FP8 kernel per (shape, rows),
    today's or a new one."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["n"], r["k"], r["rows"])
        if tag(r) != "bf16" and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    table: dict[str, dict[str, Any]] = {}
    for (n, k, rows), r in sorted(best.items()):
        table.setdefault(f"{n}x{k}", {})[str(rows)] = dict(r["params"])
    return table


def summary_lines(pr: GemvProbe) -> list[str]:
    lines = ["", f"copy rate {pr.copy_rate:.0f} GB/s; four projections added up (best per shape):"]
    for t in decode_totals(pr.results):
        lines.append(f"rows {t['rows']:>2}: bf16 {t['bf16_us']:7.1f} us, today {t['today_us']:7.1f} us "
                     f"({t['today_x_bf16']:.2f}x, {t.get('today_pct_of_copy', float('nan')):.0f}% copy), best new "
                     f"{t['new_us']:7.1f} us ({t['new_x_bf16']:.2f}x, {t.get('new_pct_of_copy', float('nan')):.0f}%), "
                     f"served {t['served_us']:7.1f} us ({t['served_x_bf16']:.2f}x)")
    return lines + pr.failure_lines()


def write_configs(path: Path, device_name: str, entries: dict[str, dict[str, Any]]) -> None:
    """The shipped table with this device's FP8 entries replaced by ``entries`` (the fastest measured here)."""
    table = json.loads(SHIPPED_CONFIGS.read_text())
    table.setdefault(device_name, {})["fp8"] = entries
    for shape in entries.values():  # every entry must load: a bad one would fail every FP8 linear call
        for entry in shape.values():
            config_from_json(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def sass_report() -> int:
    """No GPU: compile every candidate for sm_90 (the 4096 x 4096 shape) and print registers, spills and K-loop
    SASS instructions a weight a thread."""
    from triton_sass import compile_sm90

    from tokenmill.kernels.fp8_stream import _fp8_fma_kernel, _fp8_mma_kernel

    seen = set()
    for rows in sorted(set(ROWS)):
        for c in candidates(rows):
            key = (c, rows if c.kind == "fma" else 16)
            if key in seen:
                continue
            seen.add(key)
            common = dict(b_ptr="*fp32", ws_ptr="*fp32", out_ptr="*bf16", M="i32", N="i32:16", stride_om="i32:16",
                          HAS_BIAS=False, BLOCK_N=c.block_n, EVEN=True, PDL=c.pdl)
            if c.kind == "fma":
                info = compile_sm90(_fp8_fma_kernel, dict(
                    common, x_ptr="*i64", w_ptr="*i32", KW="i32:16", stride_xq="i32:16", stride_ww="i32:16",
                    ROWS=next_power_of_2(rows), PAIRS=c.pairs, X_BF16=True, ASM=c.asm, PREFETCH=c.prefetch),
                    c.num_warps, c.num_stages)
                weights = c.block_n * c.pairs * 8 / (32 * c.num_warps)
            else:
                info = compile_sm90(_fp8_mma_kernel, dict(
                    common, x_ptr="*bf16", w_ptr="*fp8e4nv", part_ptr="*fp32", cnt_ptr="*i32", K="i32:16",
                    stride_xm="i32:16", stride_wn="i32:16", x_prescale="fp32", x_unscale="fp32", SPLIT_K=c.split_k,
                    BLOCK_K=c.block_k, DOT_F32=False), c.num_warps, c.num_stages)
                weights = c.block_n * c.block_k / (32 * c.num_warps)
            print(f"rows {rows:>2} {c.name:36} regs {info.registers:3} spill {info.spill_bytes:3} B  K loop "
                  f"{info.loop_cost():4} instr = {info.loop_cost() / weights:.2f} a weight", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_fp8_gemv_probe.json"))
    parser.add_argument("--time-limit", type=float, default=140.0,
                        help="seconds from the process start after which no new measurement starts")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--configs-out", help="also write quant_dispatch's table with this device's FP8 winners")
    parser.add_argument("--sass", action="store_true", help="no GPU: sm_90 compile report of every candidate")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="TRITON_INTERPRET=1 on CPU: tiny shapes, 2 copies, every check, meaningless times")
    args = parser.parse_args()
    if args.sass:
        return sass_report()
    global COPIES
    if args.cpu_dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-dry-run needs TRITON_INTERPRET=1")
        device, shapes, COPIES, timer = torch.device("cpu"), TINY_SHAPES, 2, cpu_us
    elif not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu-dry-run / --sass)")
    else:
        device, shapes, timer = torch.device("cuda"), SHAPES, cuda_graph_us
    copy_rate = copy_rate_gbps(device) if device.type == "cuda" else 3000.0
    pr = GemvProbe(START, args.time_limit, Path(args.out), timer,
                   lambda case, us: 100 * case["bytes"] / (copy_rate * 1e9) / (us * 1e-6), "pct_of_copy")
    pr.copy_rate = copy_rate
    gen = torch.Generator(device=device).manual_seed(0)
    pr.run(lambda: {s: Weights(*shapes[s], COPIES, device, gen) for s in args.shapes.split(",")},
           [int(r) for r in args.rows.split(",")], lambda p, shape, w, rows: probe_case(p, shape, w, rows, gen),
           write)
    pr.out.with_suffix(".txt").write_text("\n".join(lines(pr)) + "\n")
    print("\n".join(lines(pr, top=3)))  # the console keeps the fastest three a case
    if args.configs_out and pr.results:
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        write_configs(Path(args.configs_out), name, suggested_entries(pr.results))
    return 1 if pr.failures or pr.fatal else 0


if __name__ == "__main__":
    sys.exit(main())
