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

``--configs-out FILE`` writes the fastest kernel per (format, shape, rows) as the table kernels/quant_dispatch.py
reads (``TOKENMILL_QUANT_GEMV_CONFIGS=FILE`` points the engine at one). The shipped table was made from run 1
without a GPU:

    python3 benchmarks/gpu_quant_gemv_sweep.py --out /dev/null --configs-out tokenmill/kernels/configs/quant_gemv.json \
        --table-from benchmarks/results/gpu_quant_gemv_sweep_h100_2026-12-06.json

``--budget-s`` stops starting new candidates once spent (those skipped are listed), so the run always writes its
JSON. Needs torch + triton only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_pdl_probe import time_graph  # noqa: E402
from gpu_record import write_record  # noqa: E402

from tokenmill.cuda_timing import median_event_ms  # noqa: E402
from tokenmill.kernels.fp8_gemv import fp8_gemv  # noqa: E402
from tokenmill.kernels.fp8_quant import quantize_fp8  # noqa: E402
from tokenmill.kernels.splitk import SplitKConfig  # noqa: E402
from tokenmill.kernels.wna16_gemm import (  # noqa: E402
    PackedWeight,
    WNA16Config,
    default_config,
    dequantize,
    wna16_linear,
)
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


def rows_cfg(m: int, n: int, k: int, s: int, w: int = 4) -> SplitKConfig:
    return SplitKConfig(block_m=m, block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=2, kind="rows")


def fma(m: int, n: int, k: int, s: int, w: int = 4) -> SplitKConfig:
    return SplitKConfig(block_m=m, block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=2, kind="fma")


def dot(m: int, n: int, s: int, w: int = 4, st: int = 3, k: int = 128, kind: str = "dot") -> SplitKConfig:
    return SplitKConfig(block_m=m, block_n=n, block_k=k, split_k=s, num_warps=w, num_stages=st, kind=kind)


# Run 1 (2026-12-06 18:45, H100) timed the "fma" and "dot" kinds at 23-40% of the 4-bit floor and the tiled
# kernel's 128-row tiles as the best above 16 rows; run 2 adds the per-row "rows" kind with wider K steps and a
# prefetched tile, and "dot_k", beside run 1's winners.
def wna16_candidates(rows: int, bits: int) -> list[SplitKConfig | WNA16Config]:
    if bits == 8:
        return {1: [rows_cfg(1, 128, 128, 8), rows_cfg(1, 128, 256, 4, 8), rows_cfg(1, 64, 256, 4)],
                4: [rows_cfg(4, 128, 128, 4), rows_cfg(4, 64, 256, 4), dot(16, 64, 4)],
                16: [dot(16, 64, 4), dot(16, 128, 4), dot(16, 64, 4, k=128, kind="dot_k")],
                64: [WNA16Config(128, 64, 64, 2, 8)], 256: [WNA16Config(128, 64, 64, 1, 8)]}[rows]
    return {1: [rows_cfg(1, 64, 256, 4), rows_cfg(1, 128, 128, 8), rows_cfg(1, 128, 256, 4),
                rows_cfg(1, 128, 256, 8, 8), rows_cfg(1, 256, 128, 4, 8), rows_cfg(1, 256, 256, 4, 8),
                rows_cfg(1, 128, 512, 2, 8), rows_cfg(1, 64, 512, 4), WNA16Config(16, 128, 128, 8, gemv=True)],
            4: [rows_cfg(4, 64, 128, 8), rows_cfg(4, 128, 128, 4), rows_cfg(4, 128, 256, 4, 8),
                rows_cfg(4, 64, 256, 4), dot(16, 64, 4)],
            16: [dot(16, 128, 8), dot(16, 128, 4), dot(16, 64, 4), dot(16, 64, 4, kind="dot_k"),
                 dot(16, 128, 4, k=256, kind="dot_k"), rows_cfg(4, 128, 128, 4)],
            64: [WNA16Config(128, 64, 64, 2, 8), dot(64, 128, 1, 8, kind="dot_k"), dot(64, 64, 2, kind="dot_k")],
            256: [WNA16Config(128, 64, 64, 1, 8), dot(128, 128, 1, 8, kind="dot_k")]}[rows]


def fp8_candidates(rows: int) -> list[SplitKConfig]:
    return {1: [rows_cfg(1, 16, 512, 2), rows_cfg(1, 32, 256, 2), rows_cfg(1, 16, 256, 4), rows_cfg(1, 32, 512, 2),
                rows_cfg(1, 64, 256, 2), fma(1, 32, 256, 2), fma(1, 16, 512, 2)],
            4: [rows_cfg(4, 16, 256, 2), rows_cfg(4, 32, 128, 4), rows_cfg(4, 16, 512, 2), dot(16, 64, 4)],
            16: [dot(16, 64, 4), dot(16, 128, 8), dot(16, 64, 8)], 64: [], 256: []}[rows]


def random_packed(n: int, k: int, bits: int, zeros: bool, gen: torch.Generator,
                  device: str = "cuda") -> PackedWeight:
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // (32 // bits), n), device=device, dtype=torch.int32,
                            generator=gen)
    scales = (torch.rand(k // GROUP, n, device=device, generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
    zero = (torch.randint(0, 2**bits, (k // GROUP, n), device=device, generator=gen).to(torch.bfloat16)
            if zeros else None)
    return PackedWeight(qweight, scales, zero, bits, GROUP)


def packed_bytes(p: PackedWeight) -> int:
    return p.qweight.nbytes + p.scales.nbytes + (0 if p.zeros is None else p.zeros.nbytes)


def graph_us(fn, repeats: int = 15) -> float:
    """Median µs of one call: a CUDA graph of ``fn`` (one call per weight copy) replayed, divided by the copies."""
    return time_graph(fn, repeats) / COPIES


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

    def candidate(self, shape: str, rows: int, fmt: str, config: SplitKConfig | WNA16Config | None, call, batch_call,
                  ref: torch.Tensor, floor_bytes: int, bf16_us: float, tol: float = TOLERANCE) -> None:
        """Check ``call()`` twice against ``ref``, then time ``batch_call`` (one call per weight copy)."""
        kernel, name, params = describe(config, fmt)
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
        if not max(errs) < tol:
            self.failures.append({"case": label, "rel_err": errs})
            print(f"MISMATCH {label}: rel err {errs}", flush=True)
            return
        us = graph_us(batch_call)
        self.results.append({"shape": shape, "rows": rows, "format": fmt, "kernel": kernel, "config": name,
                             "params": params, "us": us, "rel_err": max(errs),
                             "pct_of_floor": 100 * floor_bytes / FLOOR_BYTES_PER_S / (us * 1e-6),
                             "speedup_vs_bf16": bf16_us / us})


def describe(config: SplitKConfig | WNA16Config | None, fmt: str) -> tuple[str, str, dict[str, Any]]:
    """(kernel, name, the entry kernels/quant_dispatch.py's table reads) of a candidate."""
    if isinstance(config, SplitKConfig):
        return ("fp8_gemv" if fmt == "fp8" else "splitk"), config.name, {"kernel": "splitk", **asdict(config)}
    if isinstance(config, WNA16Config):
        return "wna16_gemm", config.name, {"kernel": "wna16_gemm", **asdict(config)}
    return "scaled_mm", "fp8_linear", {"kernel": "scaled_mm"}


class Weights:
    """One shape's operands: 32 copies each of bf16, W4, W8 (GPTQ layout, group 128) and FP8 weights."""

    def __init__(self, n: int, k: int, gen: torch.Generator) -> None:
        self.n, self.k = n, k
        self.dense = [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
                      for _ in range(COPIES)]
        self.packed = {bits: [random_packed(n, k, bits, False, gen) for _ in range(COPIES)] for bits in (4, 8)}
        self.fp8 = [(q, s.view(-1)) for q, s in (quantize_fp8(w, dim=1) for w in self.dense)]


def sweep_rows(sw: Sweep, shape: str, w: Weights, rows: int, gen: torch.Generator) -> None:
    x = torch.randn(rows, w.k, device="cuda", generator=gen).to(torch.bfloat16)
    bf16_us = graph_us(lambda: [F.linear(x, d) for d in w.dense])
    sw.results.append({"shape": shape, "rows": rows, "format": "bf16", "kernel": "cublas", "config": "F.linear",
                       "us": bf16_us, "pct_of_floor": 100 * w.dense[0].nbytes / FLOOR_BYTES_PER_S / (bf16_us * 1e-6),
                       "speedup_vs_bf16": 1.0})
    for bits in (4, 8):
        packed = w.packed[bits]
        ref = x.float() @ dequantize(packed[0])
        floor = packed_bytes(packed[0])
        fmt = f"w{bits}a16"
        for config in wna16_candidates(rows, bits) + [None]:
            if isinstance(config, SplitKConfig):
                call = lambda c=config, p=packed[0]: wna16_splitk_linear(x, p, None, c)  # noqa: E731
                batch = lambda c=config, ps=packed: [wna16_splitk_linear(x, p, None, c) for p in ps]  # noqa: E731
            else:  # the tiled kernel (None: its default config, what served before this kernel)
                config = config or default_config(rows, w.n, w.k, GROUP)
                call = lambda c=config, p=packed[0]: wna16_linear(x, p, None, c)  # noqa: E731
                batch = lambda c=config, ps=packed: [wna16_linear(x, p, None, c) for p in ps]  # noqa: E731
            sw.candidate(shape, rows, fmt, config, call, batch, ref, floor, bf16_us)
        del ref
    q0, s0 = w.fp8[0]
    ref = x.float() @ (q0.float() * s0.view(-1, 1)).t()
    floor = q0.nbytes + s0.nbytes
    for config in fp8_candidates(rows):
        sw.candidate(shape, rows, "fp8", config, lambda c=config: fp8_gemv(x, q0, s0, None, c),
                     lambda c=config: [fp8_gemv(x, q, s, None, c) for q, s in w.fp8], ref, floor, bf16_us)
    # _scaled_mm also quantizes the activations to e4m3 (~2.6% relative error against unquantized x)
    sw.candidate(shape, rows, "fp8", None, lambda: fp8_linear(x, q0, s0, None),
                 lambda: [fp8_linear(x, q, s, None) for q, s in w.fp8], ref, floor, bf16_us, tol=5e-2)
    print(f"{shape} rows={rows} done at {time.monotonic() - sw.start:.0f} s", flush=True)


SPLITK_NAME = re.compile(r"^(rows|fma|dot|dot_k)_m(\d+)_n(\d+)_k(\d+)_s(\d+)_w(\d+)_st(\d+)(_pf)?$")
TILED_NAME = re.compile(r"^(gemv_|m(\d+)_)n(\d+)_k(\d+)_s(\d+)_w(\d+)_st(\d+)$")


def params_from_name(r: dict[str, Any]) -> dict[str, Any]:
    """The table entry of a result written before results carried ``params`` (run 1): parsed from its name."""
    if r["kernel"] == "scaled_mm":
        return {"kernel": "scaled_mm"}
    if r["kernel"] in ("splitk", "fp8_gemv"):
        kind, m, n, k, s, w, st, pf = SPLITK_NAME.match(r["config"]).groups()
        return {"kernel": "splitk", **asdict(SplitKConfig(int(m), int(n), int(k), int(s), int(w), int(st), kind,
                                                          pf is not None))}
    if r["config"] == "default":
        n, k = SHAPES[r["shape"]]
        return {"kernel": "wna16_gemm", **asdict(default_config(r["rows"], n, k, GROUP))}
    gemv, m, n, k, s, w, st = TILED_NAME.match(r["config"]).groups()
    return {"kernel": "wna16_gemm", **asdict(WNA16Config(16 if gemv == "gemv_" else int(m), int(n), int(k), int(s),
                                                         int(w), int(st), gemv == "gemv_"))}


def configs_table(results: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The fastest kernel per (format, shape, rows), in the form kernels/quant_dispatch.py reads (W4A16/W8A16 at
    group 128: what was measured); FP8 rows where ``_scaled_mm`` won map to it."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        if r["format"] == "bf16":
            continue
        key = (r["format"], r["shape"], r["rows"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for (fmt, shape, rows), r in sorted(best.items()):
        n, k = SHAPES[shape]
        name = "fp8" if fmt == "fp8" else f"{fmt}_g{GROUP}"
        table.setdefault(name, {}).setdefault(f"{n}x{k}", {})[str(rows)] = r.get("params") or params_from_name(r)
    return {device: table}


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


def write_table(path: Path, table: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=200.0, help="no new candidate starts after this")
    parser.add_argument("--configs-out", help="also write the winners as kernels/quant_dispatch.py's config table")
    parser.add_argument("--table-from", help="no timing: write --configs-out from this earlier run's JSON")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = parser.parse_args()
    if args.table_from:
        if not args.configs_out:
            raise SystemExit("--table-from needs --configs-out")
        record = json.loads(Path(args.table_from).read_text())
        write_table(Path(args.configs_out), configs_table(record["results"], record["device"]))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sw = Sweep(args.budget_s)
    rate = copy_rate_gbps()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_list = tuple(int(r) for r in args.rows.split(","))
    weights = {shape: Weights(*SHAPES[shape], gen) for shape in args.shapes.split(",")}  # ~32 GB for all four
    for rows in rows_list:  # rows outer: a budget cut loses the largest batches, not whole shapes
        for shape, w in weights.items():
            sweep_rows(sw, shape, w, rows, gen)
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
    if args.configs_out:
        write_table(Path(args.configs_out), configs_table(sw.results, torch.cuda.get_device_name()))
    return 1 if sw.failures else 0


if __name__ == "__main__":
    sys.exit(main())
