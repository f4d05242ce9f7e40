"""Does cuBLAS pick a faster kernel for a decode projection when asked for the transposed product?

``F.linear(x, W)`` ([M, K] x [N, K]^T) against ``torch.mm(W, x.T)`` ([N, M], the same numbers transposed) and
against F.linear on a padded row count, for the Llama-3-8B projections at 128-256 rows. L2 is flushed between
calls (triton's do_bench), as in a decode step where the weights come from HBM. Prints a table, writes JSON.

    python3 benchmarks/gpu_gemm_orientation.py --out $OUT     # H100, ~1 min
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_record import write_record

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]


def main() -> int:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="128,192,256")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for name, k, n in SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weight.float())
            variants = {
                "linear": lambda x=x, w=weight: F.linear(x, w),
                "mm_transposed": lambda x=x, w=weight: torch.mm(w, x.t()),
                "mm_transposed_contiguous": lambda x=x, w=weight: torch.mm(w, x.t()).t().contiguous(),
            }
            for variant, fn in variants.items():
                out = fn()
                out = out.t() if variant == "mm_transposed" else out
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = float(do_bench(fn, warmup=10, rep=50, return_mode="median"))
                rows.append({"layer": name, "m": m, "k": k, "n": n, "variant": variant, "us": 1e3 * ms,
                             "tflops": 2 * m * k * n / ms / 1e9, "gbps": 2 * k * n / ms / 1e6, "rel_err": err})
                print(f"{name:<8} {m:>4} {variant:<26} {1e3 * ms:8.1f} us {rows[-1]['tflops']:7.1f} TFLOP/s "
                      f"err {err:.1e}", flush=True)
    write_record(Path(args.out) / "gpu_gemm_orientation.json", "gpu_gemm_orientation", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
