"""Sweep of the split-K weight-streaming kernels (W4A16, W8A16: kernels/wna16_splitk.py; FP8 weights:
kernels/fp8_gemv.py) against cuBLAS bf16, the tiled wna16 kernel and ``torch._scaled_mm`` on Llama-3-8B's decode
projections (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) at 1, 4, 16, 64 and 256 rows.

Correctness first: every candidate config is run twice (the second call proves the split-K counters were left
at zero) and checked against the fp32 product with the dequantized weight on fresh random inputs; a mismatch is
recorded and the config is not timed (the exit status is 1). Timing is a decode step's: one CUDA graph runs the
projection once per layer over 32 distinct weight copies (hundreds of MB, so every call reads its weight from
HBM, never L2), replays timed with CUDA events, median; µs per call. The byte floor is the weight bytes (codes +
scales + zero points) over 3.0 TB/s (the copy rate measured in the same run is recorded too).

    python3 benchmarks/gpu_quant_gemv_sweep.py --out $OUT/sweep.json    # H100, < 4 min

``--budget-s`` stops starting new candidates once spent (those skipped are listed), so the run always writes its
JSON. Needs torch + triton only.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_record import write_record  # noqa: E402

from tokenmill.cuda_timing import median_event_ms  # noqa: E402
from tokenmill.kernels.fp8_gemv import fp8_gemv  # noqa: E402
from tokenmill.kernels.fp8_quant import quantize_fp8  # noqa: E402
from tokenmill.kernels.splitk import SplitKConfig  # noqa: E402
from tokenmill.kernels.wna16_gemm import PackedWeight, WNA16Config, dequantize, wna16_linear  # noqa: E402
from tokenmill.kernels.wna16_splitk import wna16_splitk_linear  # noqa: E402
from tokenmill.quantization.fp8 import fp8_linear  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 4, 16, 64, 256)
COPIES = 32
GROUP = 128
FLOOR_BYTES_PER_S = 3.0e12
TOLERANCE = 2e-2  # bf16 output rounding is ~3e-3

try:  # Triton's error for a config whose tiles do not fit the SM's shared memory / registers
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    OutOfResources = RuntimeError


def fma(m: int, n: int, k: int, s: int, w: int = 4) -> SplitKConfig:
    return SplitKConfig(block_m=m, block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=2)


def dot(m: int, n: int, s: int, w: int = 4, st: int = 3, k: int = 128) -> SplitKConfig:
    return SplitKConfig(block_m=m, block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=st, dot=True)


def wna16_candidates(rows: int, bits: int) -> list[SplitKConfig]:
    small = bits == 8  # W8A16: a narrower sweep
    if rows == 1:
        if small:
            return [fma(1, n, 128, s) for n in (64, 128) for s in (4, 8)]
        return ([fma(1, n, 128, s) for n in (32, 64, 128) for s in (2, 4, 8)]
                + [fma(1, 256, 128, 4, 8), fma(1, 64, 128, 4, 2), fma(1, 128, 128, 16)])
    if rows <= 4:
        if small:
            return [fma(4, n, 128, 4) for n in (64, 128)] + [dot(16, 64, 4)]
        return [fma(4, n, 128, s) for n in (32, 64, 128) for s in (2, 4, 8)] + [dot(16, 64, 4), dot(16, 128, 4)]
    if rows <= 16:
        if small:
            return [fma(16, 32, 128, 4)] + [dot(16, n, s) for n in (64, 128) for s in (2, 4)]
        return ([fma(16, 32, 128, s) for s in (4, 8)] + [fma(16, 64, 128, 4)]
                + [dot(16, n, s) for n in (32, 64, 128) for s in (1, 2, 4, 8)])
    if rows <= 64:
        tiles = [(16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (64, 128, 4, 4),
                 (64, 256, 8, 3)]
        if small:
            tiles = tiles[2:5]
        return [dot(m, n, s, w, st) for m, n, w, st in tiles for s in (1, 2)]
    tiles = [(64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 8, 3),
             (128, 256, 8, 3)]
    if small:
        tiles = tiles[1:4]
    return [dot(m, n, 1, w, st) for m, n, w, st in tiles]


def fp8_candidates(rows: int) -> list[SplitKConfig]:
    if rows == 1:
        return [fma(1, n, k, s) for n, k in ((16, 256), (32, 256), (16, 512), (32, 128)) for s in (2, 4, 8)]
    if rows <= 4:
        return [fma(4, n, k, s) for n, k in ((16, 128), (32, 128), (16, 256)) for s in (2, 4)] + [
            dot(16, 64, s, k=128) for s in (2, 4)]
    if rows <= 16:
        return [dot(16, n, s, k=128) for n in (32, 64, 128) for s in (2, 4, 8)] + [dot(16, 64, 4, k=256)]
    return []


def wna16_old_configs(rows: int) -> list[WNA16Config]:
    """The tiled kernel's default and the best configs of benchmarks/results/gpu_quantized_kernels_h100_2026-12-06."""
    best = {1: WNA16Config(16, 128, 128, 8, gemv=True), 4: WNA16Config(16, 64, 64, 4),
            16: WNA16Config(16, 64, 64, 8), 64: WNA16Config(128, 64, 64, 2, 8), 256: WNA16Config(128, 64, 64, 1, 8)}
    return [best[rows]]


def random_packed(n: int, k: int, bits: int, zeros: bool, gen: torch.Generator) -> PackedWeight:
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // (32 // bits), n), device="cuda", dtype=torch.int32,
                            generator=gen)
    scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
    zero = torch.randint(0, 2**bits, (k // GROUP, n), device="cuda", generator=gen).to(torch.bfloat16) if zeros else None
    return PackedWeight(qweight, scales, zero, bits, GROUP)


def packed_bytes(p: PackedWeight) -> int:
    return p.qweight.nbytes + p.scales.nbytes + (0 if p.zeros is None else p.zeros.nbytes)


def graph_us(fn, repeats: int = 15) -> float:
    """Median µs of one call: a CUDA graph of ``fn`` (one call per weight copy) replayed, divided by the copies."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return 1e3 * median_event_ms(graph.replay, repeats) / COPIES


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def copy_rate_gbps() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_event_ms(lambda: dst.copy_(src), 20) / 1e6


class Sweep:
    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.results: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.skipped: list[str] = []

    def over_budget(self) -> bool:
        return time.monotonic() - self.start > self.budget_s

    def candidate(self, shape: str, rows: int, fmt: str, kernel: str, name: str, call, batch_call, ref, floor_bytes,
                  bf16_us: float) -> None:
        """Check ``call()`` twice against ``ref``, then time ``batch_call`` (one call per weight copy)."""
        label = f"{shape} rows={rows} {fmt} {kernel} {name}"
        if self.over_budget():
            self.skipped.append(label)
            return
        try:
            errs = [rel_err(call().float(), ref) for _ in range(2)]
        except OutOfResources as exc:
            self.skipped.append(f"{label}: {type(exc).__name__}")
            return
        except Exception as exc:  # a compile error in one config must not lose the whole sweep
            self.failures.append({"case": label, "error": f"{type(exc).__name__}: {exc}"})
            traceback.print_exc()
            return
        if not max(errs) < TOLERANCE:
            self.failures.append({"case": label, "rel_err": errs})
            print(f"MISMATCH {label}: rel err {errs}", flush=True)
            return
        us = graph_us(batch_call)
        self.results.append({"shape": shape, "rows": rows, "format": fmt, "kernel": kernel, "config": name,
                             "us": us, "rel_err": max(errs), "pct_of_floor": 100 * floor_bytes / FLOOR_BYTES_PER_S
                             / (us * 1e-6), "speedup_vs_bf16": bf16_us / us})


def sweep_shape(sw: Sweep, shape: str, n: int, k: int, gen: torch.Generator, rows_list: tuple[int, ...]) -> None:
    dense = [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(COPIES)]
    packed = {bits: [random_packed(n, k, bits, False, gen) for _ in range(COPIES)] for bits in (4, 8)}
    fp8 = [quantize_fp8(w, dim=1) for w in dense]
    fp8 = [(q, s.view(-1)) for q, s in fp8]
    refs_w = {bits: dequantize(packed[bits][0]) for bits in (4, 8)}  # fp32 W^T [K, N]
    ref_fp8 = (fp8[0][0].float() * fp8[0][1].view(-1, 1)).t()
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
        bf16_us = graph_us(lambda x=x: [F.linear(x, w) for w in dense])
        sw.results.append({"shape": shape, "rows": rows, "format": "bf16", "kernel": "cublas", "config": "F.linear",
                           "us": bf16_us, "pct_of_floor": 100 * dense[0].nbytes / FLOOR_BYTES_PER_S / (bf16_us * 1e-6),
                           "speedup_vs_bf16": 1.0})
        for bits in (4, 8):
            ref = x.float() @ refs_w[bits]
            floor = packed_bytes(packed[bits][0])
            fmt = f"w{bits}a16"
            for config in wna16_candidates(rows, bits):
                sw.candidate(shape, rows, fmt, "splitk", config.name,
                             lambda x=x, c=config, p=packed[bits][0]: wna16_splitk_linear(x, p, None, c),
                             lambda x=x, c=config, ps=packed[bits]: [wna16_splitk_linear(x, p, None, c) for p in ps],
                             ref, floor, bf16_us)
            for config in [None] + (wna16_old_configs(rows) if bits == 4 else []):
                name = "default" if config is None else config.name
                sw.candidate(shape, rows, fmt, "wna16_gemm", name,
                             lambda x=x, c=config, p=packed[bits][0]: wna16_linear(x, p, None, c),
                             lambda x=x, c=config, ps=packed[bits]: [wna16_linear(x, p, None, c) for p in ps],
                             ref, floor, bf16_us)
        ref = x.float() @ ref_fp8
        floor = fp8[0][0].nbytes + fp8[0][1].nbytes
        for config in fp8_candidates(rows):
            sw.candidate(shape, rows, "fp8", "fp8_gemv", config.name,
                         lambda x=x, c=config, w=fp8[0]: fp8_gemv(x, w[0], w[1], None, c),
                         lambda x=x, c=config: [fp8_gemv(x, q, s, None, c) for q, s in fp8],
                         ref, floor, bf16_us)
        sw.candidate(shape, rows, "fp8", "scaled_mm", "fp8_linear",
                     lambda x=x, w=fp8[0]: fp8_linear(x, w[0], w[1], None),
                     lambda x=x: [fp8_linear(x, q, s, None) for q, s in fp8],
                     ref, floor, bf16_us)
        print(f"{shape} rows={rows} done at {time.monotonic() - sw.start:.0f} s", flush=True)


def best_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, rows, format, kernel): the fastest config."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["shape"], r["rows"], r["format"], r["kernel"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return list(best.values())


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'shape':8} {'rows':>4} {'format':7} {'kernel':11} {'us':>8} {'%floor':>7} {'x bf16':>7}  config")
    for r in sorted(best_rows(results), key=lambda r: (list(SHAPES).index(r["shape"]), r["rows"], r["format"],
                                                      r["us"])):
        print(f"{r['shape']:8} {r['rows']:>4} {r['format']:7} {r['kernel']:11} {r['us']:8.2f} "
              f"{r['pct_of_floor']:6.1f}% {r['speedup_vs_bf16']:6.2f}x  {r['config']}")


def decode_totals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four projections added up per rows and format (best kernel each): a decoder layer's linears."""
    best: dict[tuple, float] = {}
    for r in best_rows(results):
        key = (r["rows"], r["format"], r["shape"])
        best[key] = min(best.get(key, float("inf")), r["us"])
    totals = []
    for rows in sorted({r["rows"] for r in results}):
        bf16 = sum(best.get((rows, "bf16", s), float("nan")) for s in SHAPES)
        for fmt in ("w4a16", "w8a16", "fp8"):
            us = sum(best.get((rows, fmt, s), float("nan")) for s in SHAPES)
            totals.append({"rows": rows, "format": fmt, "us": us, "bf16_us": bf16, "speedup_vs_bf16": bf16 / us})
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=200.0, help="no new candidate starts after this")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sw = Sweep(args.budget_s)
    rate = copy_rate_gbps()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_list = tuple(int(r) for r in args.rows.split(","))
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        sweep_shape(sw, shape, n, k, gen, rows_list)
        torch.cuda.empty_cache()
    print_table(sw.results)
    totals = decode_totals(sw.results)
    print("\nfour projections added up (best per shape):")
    for t in totals:
        print(f"rows {t['rows']:>3} {t['format']:6} {t['us']:8.1f} us vs bf16 {t['bf16_us']:8.1f} us: "
              f"{t['speedup_vs_bf16']:.2f}x")
    print(f"copy rate {rate:.0f} GB/s; {len(sw.failures)} failures; {len(sw.skipped)} skipped; "
          f"{time.monotonic() - sw.start:.0f} s")
    for f in sw.failures:
        print("FAILED", f)
    write_record(Path(args.out), "gpu_quant_gemv_sweep", copy_rate_gbps=rate, floor_bytes_per_s=FLOOR_BYTES_PER_S,
                 copies=COPIES, group_size=GROUP, results=sw.results, best=best_rows(sw.results),
                 decode_totals=totals, failures=sw.failures, skipped=sw.skipped,
                 wall_s=time.monotonic() - sw.start)
    return 1 if sw.failures else 0


if __name__ == "__main__":
    sys.exit(main())
