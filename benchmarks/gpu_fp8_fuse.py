"""Issue 22: RMSNorm (+ residual) and SiLU-and-mul writing FP8 for the next W8A8 linear, fused vs unfused.

At a max-load decode step (950 rows; Llama-3-8B: hidden 4096, intermediate 14336, bf16) each pair is timed both
ways, one CUDA-graph replay of 10 calls (launch overhead out): unfused, the bf16 kernel then
``quantize_fp8_per_token`` (what the profile of 2026-12-07 shows: 1.1 ms of quantization a step); fused, the one
program (at its default warp count, and a small sweep of warp counts to tune it). Before timing, the fused output is compared with the unfused pair's (codes and scales: identical on the
GPU). The per-step figure counts 32 layers x (2 norms + 1 activation).

    python3 benchmarks/gpu_fp8_fuse.py --out $OUT/gpu_fp8_fuse.json                       # H100, ~10 s
    TRITON_INTERPRET=1 python3 benchmarks/gpu_fp8_fuse.py --dry-run --out /tmp/fuse.json   # CPU: plumbing only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_record import write_record  # noqa: E402

from tokenmill.kernels.activation import silu_and_mul_fp8_triton, silu_and_mul_triton  # noqa: E402
from tokenmill.kernels.fp8_quant import Fp8Tokens, quantize_fp8_per_token_triton  # noqa: E402
from tokenmill.kernels.rms_norm import rms_norm_fp8_triton, rms_norm_triton  # noqa: E402

CALLS_PER_GRAPH = 10
LAYERS = 32  # Llama-3-8B: two norms and one activation per layer feed W8A8 linears


def time_us(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median µs of one call: CUDA-graph replays of CALLS_PER_GRAPH calls; on CPU (dry run) one wall-clock call."""
    if device != "cuda":
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start)
    from gpu_pdl_probe import time_graph

    return time_graph(lambda: [fn() for _ in range(CALLS_PER_GRAPH)], repeats) / CALLS_PER_GRAPH


def agreement(fused: Fp8Tokens, values: torch.Tensor, scales: torch.Tensor) -> dict[str, float]:
    return {"codes_equal_share": (fused.values.view(torch.uint8) == values.view(torch.uint8)).float().mean().item(),
            "scales_max_rel_diff": ((fused.scales - scales).abs() / scales).max().item()}


def bench_pair(name: str, unfused: Callable[[], tuple[torch.Tensor, torch.Tensor]],
               fused: Callable[[int | None], Fp8Tokens], warps: tuple[int, ...], bytes_moved: dict[str, int],
               device: str, repeats: int) -> dict[str, Any]:
    """``fused(num_warps)``: None is the wrapper's own choice (the one compared and reported as fused_us); the
    ``warps`` sweep is timed only (another warp count reduces the row in another order)."""
    row: dict[str, Any] = {"op": name, **agreement(fused(None), *unfused())}
    row["unfused_us"] = time_us(unfused, device, repeats)
    row["fused_us"] = time_us(lambda: fused(None), device, repeats)
    row["fused_us_by_num_warps"] = {w: time_us(lambda w=w: fused(w), device, repeats) for w in warps}
    row["saved_us"] = row["unfused_us"] - row["fused_us"]
    for way in ("unfused", "fused"):
        row[f"{way}_gbps"] = bytes_moved[way] / (row[f"{way}_us"] * 1e3)
    print(f"[{name}] unfused {row['unfused_us']:.1f} us ({row['unfused_gbps']:.0f} GB/s), fused {row['fused_us']:.1f} "
          f"us ({row['fused_gbps']:.0f} GB/s); codes equal {100 * row['codes_equal_share']:.3f}%, scales max rel "
          f"diff {row['scales_max_rel_diff']:.2e}; fused by num_warps "
          f"{ {w: round(t, 1) for w, t in row['fused_us_by_num_warps'].items()} }", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=950)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--dry-run", action="store_true",
                        help="8 rows, widths 256 / 512 (CPU under TRITON_INTERPRET=1; implied without CUDA)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu":  # the interpreter at full size would take hours
        args.dry_run = True
    if args.dry_run:
        args.rows, args.hidden, args.intermediate = 8, 256, 512
    rows, hidden, inter = args.rows, args.hidden, args.intermediate
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
    residual = torch.randn(rows, hidden, generator=gen).to(device, torch.bfloat16)
    weight = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(device, torch.bfloat16)
    gate_up = torch.randn(rows, 2 * inter, generator=gen).to(device, torch.bfloat16)
    # Bytes each way moves: bf16 in (x, residual, weight) and out (sum, normed), e4m3 codes + fp32 scales; the
    # unfused pair writes the bf16 row and reads it back.
    norm_io = 2 * rows * hidden * 2 + 2 * hidden + rows * hidden * 2 + rows * hidden + 4 * rows
    act_io = rows * 2 * inter * 2 + rows * inter + 4 * rows
    runs = [
        bench_pair("rms_norm_residual", lambda: quantize_fp8_per_token_triton(rms_norm_triton(x, weight, 1e-5, residual)[0]),
                   lambda w: rms_norm_fp8_triton(x, weight, 1e-5, residual, num_warps=w)[0], (4, 8, 16),
                   {"unfused": norm_io + 2 * rows * hidden * 2, "fused": norm_io}, device, args.repeats),
        bench_pair("silu_and_mul", lambda: quantize_fp8_per_token_triton(silu_and_mul_triton(gate_up)),
                   lambda w: silu_and_mul_fp8_triton(gate_up, num_warps=w), (8, 16, 32),
                   {"unfused": act_io + 2 * rows * inter * 2, "fused": act_io}, device, args.repeats),
    ]
    per_step_saved_ms = LAYERS * (2 * runs[0]["saved_us"] + runs[1]["saved_us"]) / 1e3
    print(f"per decode step at {rows} rows ({LAYERS} layers x 2 norms + 1 activation): {per_step_saved_ms:.2f} ms saved")
    path = write_record(Path(args.out), "gpu_fp8_fuse", rows=rows, hidden=hidden, intermediate=inter,
                        dry_run=args.dry_run, runs=runs, per_step_saved_ms=per_step_saved_ms)
    print(f"wrote {path}")
    failed = [r["op"] for r in runs if device == "cuda" and r["codes_equal_share"] < 0.999]
    if failed:
        print(f"fused codes differ from the unfused pair's in {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
