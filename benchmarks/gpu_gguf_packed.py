"""GGUF linears kept packed on the GPU: each type's repacked layout (quantization/gguf_blocks.py: Q4_0/Q4_1/Q4_K
4-bit group 32, Q8_0/Q5_K 8-bit group 32, Q6_K 8-bit group 16; K-quant scales fp32) through the W4A16 / W8A16
Triton kernels (default config, as served) against bf16 cuBLAS on Llama-3-8B's decode projections.

Correctness first: random GGUF block bytes of every type are decoded as the loader does and the kernel output is
checked against the fp32 dequantized product at 1, 16 and 64 rows (the run stops on a mismatch). Then, per
projection (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) and row count, one CUDA graph runs
the projection for all 32 layers (32 distinct weights: nothing served from L2), timed with CUDA events (median).
Random codes for the timing: speed does not depend on the values. Weight bits per element of each layout (codes +
scales + zeros) are reported beside the file's own. No gguf package needed.

    python3 benchmarks/gpu_gguf_packed.py --out $OUT/gpu_gguf_packed.json   # H100, ~3-4 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from gpu_decode_linears import copy_rate_gbps
from gpu_pdl_probe import time_graph
from gpu_record import write_record

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "quantization")]

from gguf_blocks_helpers import random_gguf_linear  # noqa: E402

from tokenmill.kernels.wna16_gemm import PackedWeight, wna16_linear, wna16_linear_reference  # noqa: E402
from tokenmill.quantization.gguf import PACKED_TYPES  # noqa: E402

LAYERS = 32
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 16, 64, 256)
FILE_BITS = {"Q4_0": 4.5, "Q4_1": 5.0, "Q8_0": 8.5, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625}


def to_cuda(tensors: dict[str, torch.Tensor], type_name: str) -> PackedWeight:
    kind = PACKED_TYPES[type_name]
    return PackedWeight(tensors["qweight"].cuda(), tensors["scales"].cuda(),
                        tensors["zeros"].cuda() if "zeros" in tensors else None, kind.bits, kind.group_size)


def random_layout(type_name: str, n: int, k: int, gen: torch.Generator) -> PackedWeight:
    """The type's kernel layout with random codes (for timing)."""
    kind = PACKED_TYPES[type_name]
    groups = k // kind.group_size
    qweight = torch.randint(-(2**31), 2**31 - 1, (k * kind.bits // 32, n), device="cuda", dtype=torch.int32,
                            generator=gen)
    scales = (torch.rand(groups, n, device="cuda", generator=gen) * 0.01 + 0.002).to(kind.scale_dtype)
    zeros = None
    if kind.has_zeros:
        zeros = torch.rand(groups, n, device="cuda", generator=gen) * (2**kind.bits - 1)
    return PackedWeight(qweight, scales, zeros, kind.bits, kind.group_size)


def layout_bytes(p: PackedWeight) -> int:
    return sum(t.numel() * t.element_size() for t in (p.qweight, p.scales, p.zeros) if t is not None)


def check_correctness() -> list[dict[str, Any]]:
    checks = []
    rng = np.random.default_rng(0)
    for type_name in PACKED_TYPES:
        packed = to_cuda(random_gguf_linear(rng, type_name, 1024, 2048)[0], type_name)
        worst = 0.0
        for rows in (1, 16, 64):
            x = torch.randn(rows, 2048, device="cuda").to(torch.bfloat16)
            ref = wna16_linear_reference(x.float(), packed).float()
            err = ((wna16_linear(x, packed).float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                raise SystemExit(f"MISMATCH {type_name} rows={rows}: rel err {err}")
            worst = max(worst, err)
        checks.append({"type": type_name, "max_rel_err": worst})
    return checks


def bench_shape(name: str, n: int, k: int, rate: float, gen: torch.Generator) -> list[dict[str, Any]]:
    out = []
    dense = [torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    xs = {rows: torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16) for rows in ROWS}
    bf16 = {rows: time_graph(lambda x=x, ws=dense: [F.linear(x, w) for w in ws]) / 1e3 for rows, x in xs.items()}
    del dense
    for type_name in PACKED_TYPES:
        packed = [random_layout(type_name, n, k, gen) for _ in range(LAYERS)]
        weight_bytes = sum(layout_bytes(p) for p in packed)
        for rows, x in xs.items():
            ms = time_graph(lambda x=x, ps=packed: [wna16_linear(x, p) for p in ps]) / 1e3
            floor_ms = (weight_bytes + LAYERS * (rows * k + rows * n) * 2) / rate / 1e6
            row = {"shape": name, "n": n, "k": k, "rows": rows, "type": type_name, "ms": ms, "bf16_ms": bf16[rows],
                   "speedup_vs_bf16": bf16[rows] / ms, "pct_of_floor": 100 * floor_ms / ms,
                   "bits_per_weight": 8 * weight_bytes / (LAYERS * n * k), "file_bits_per_weight": FILE_BITS[type_name]}
            out.append(row)
            print(f"{name:8s} rows={rows:4d} {type_name:5s} {ms:8.3f} ms  bf16 {bf16[rows]:8.3f} ms  "
                  f"{row['speedup_vs_bf16']:5.2f}x  {row['pct_of_floor']:5.1f}% of floor", flush=True)
        del packed
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_gguf_packed.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    checks = check_correctness()
    print(f"correctness: max rel err {max(c['max_rel_err'] for c in checks):.2e} over {len(checks)} types")
    rate = copy_rate_gbps()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name, (n, k) in SHAPES.items():
        results += bench_shape(name, n, k, rate, gen)
    totals = []
    print("\ndecode linears (4 projections x 32 layers):")
    print(f"{'type':5s} {'bits':>5s} " + " ".join(f"{f'x@{r}':>7s}" for r in ROWS))
    for type_name in PACKED_TYPES:
        mine = [r for r in results if r["type"] == type_name]
        speedups = {rows: sum(r["bf16_ms"] for r in mine if r["rows"] == rows)
                    / sum(r["ms"] for r in mine if r["rows"] == rows) for rows in ROWS}
        bits = sum(r["bits_per_weight"] * r["n"] * r["k"] for r in mine if r["rows"] == 1) / sum(
            r["n"] * r["k"] for r in mine if r["rows"] == 1)
        totals.append({"type": type_name, "bits_per_weight": bits, "speedup_vs_bf16": speedups})
        print(f"{type_name:5s} {bits:5.2f} " + " ".join(f"{speedups[r]:7.2f}" for r in ROWS))
    path = write_record(args.out, "gpu_gguf_packed", copy_rate_gbps=rate, layers=LAYERS, correctness=checks,
                        projections=results, decode_linears=totals)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
