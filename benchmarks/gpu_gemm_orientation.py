"""Does cuBLAS pick a faster kernel for a decode projection when asked for the transposed product?

``F.linear(x, W)`` ([M, K] x [N, K]^T) against ``torch.mm(W, x.T)`` ([N, M], the same numbers transposed) and
for the Llama-3-8B projections at 128-256 rows. Timed as the start-up tuner times (runner/linear_tuning.py): in a
CUDA graph cycling through weight copies, so each call reads its weight from HBM as in a decode step (an earlier
version flushed L2 with triton's do_bench, which leaves dirty lines to write back and skewed the comparison).
Prints a table, writes JSON.

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

from tokenmill.runner.linear_tuning import graph_time_ms, weight_rotation

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096),
          ("lm_head", 4096, 128256)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="128,192,256")
    parser.add_argument("--tunableop", action="store_true", help="also time F.linear after PyTorch TunableOp tuned it")
    parser.add_argument("--name", default="gpu_gemm_orientation", help="JSON file name (without .json)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for name, k, n in SHAPES:
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        rotation = weight_rotation(weight, None)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weight.float())
            variants = {
                "linear": lambda w, b, x=x: F.linear(x, w),
                "mm_transposed": lambda w, b, x=x: torch.mm(w, x.t()),
                "mm_transposed_contiguous": lambda w, b, x=x: torch.mm(w, x.t()).t().contiguous(),
            }
            if args.tunableop:
                variants["linear_tunableop"] = lambda w, b, x=x: F.linear(x, w)
            for variant, fn in variants.items():
                if variant == "linear_tunableop":  # PyTorch TunableOp times cuBLASLt's candidates once per shape
                    torch.cuda.tunable.enable(True)
                    torch.cuda.tunable.tuning_enable(True)
                    fn(weight, None)
                    torch.cuda.synchronize()
                    torch.cuda.tunable.tuning_enable(False)
                out = fn(weight, None)
                out = out.t() if variant == "mm_transposed" else out
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = graph_time_ms(fn, rotation)
                torch.cuda.tunable.enable(False)
                rows.append({"layer": name, "m": m, "k": k, "n": n, "variant": variant, "us": 1e3 * ms,
                             "tflops": 2 * m * k * n / ms / 1e9, "gbps": 2 * k * n / ms / 1e6, "rel_err": err})
                print(f"{name:<8} {m:>4} {variant:<26} {1e3 * ms:8.1f} us {rows[-1]['tflops']:7.1f} TFLOP/s "
                      f"err {err:.1e}", flush=True)
    write_record(Path(args.out) / f"{args.name}.json", "gpu_gemm_orientation", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
