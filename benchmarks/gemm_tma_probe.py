"""Probe: a TMA-descriptor Triton GEMM against cuBLAS on the decode projections at 128/256 rows (H100).

cuBLAS runs Llama-3-8B's qkv and o_proj at 256 rows at ~390 and ~310 TFLOP/s (too few output tiles for 132 SMs);
this times a plain tile-per-program Triton kernel whose loads go through TMA descriptors, over tile shapes, to see
whether any beats cuBLAS by enough to be worth a tuner option. ``--kinds`` adds Triton's warp-specialized K loop
("ws") and persistent programs ("persistent", "persistent_ws"). Prints a table and writes JSON.
Recorded: gemm_tma_probe_2026-11-24.json (plain: 0.84-1.00x cuBLAS at best) and
gemm_tma_probe_ws_persistent_ws_2026-11-24.json (0.79-0.90x at 256 rows).

    python benchmarks/gemm_tma_probe.py --out $OUT [--kinds plain,ws,persistent_ws] [--rows 128,256]
"""

# ruff: noqa: B023  (every lambda here is timed at once, inside the loop iteration that binds its names)
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from gpu_record import write_record
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _tile_product(x_desc, w_desc, y_desc, pid_m, pid_n, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, STAGES: tl.constexpr, WS: tl.constexpr):
    # One output tile; WS: the K loop warp-specialized (TMA producer warps feeding the MMA warps).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES, warp_specialize=WS):
        a = x_desc.load([pid_m * BLOCK_M, k])
        b = w_desc.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))


@triton.jit
def _tma_gemm_kernel(x_desc, w_desc, y_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, STAGES: tl.constexpr, M_FASTEST: tl.constexpr, WS: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    if M_FASTEST:  # programs sharing a weight tile run side by side
        pid_m = pid % num_m
        pid_n = pid // num_m
    else:
        pid_n = pid % num_n
        pid_m = pid // num_n
    _tile_product(x_desc, w_desc, y_desc, pid_m, pid_n, K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES, WS)


@triton.jit
def _tma_gemm_persistent_kernel(x_desc, w_desc, y_desc, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, STAGES: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                                WS: tl.constexpr):
    # One program per SM walks tiles pid, pid + P, ...; the tile loop optionally warp-specialized.
    num_m = tl.cdiv(M, BLOCK_M)
    num_tiles = num_m * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=False, warp_specialize=WS):
        _tile_product(x_desc, w_desc, y_desc, tile % num_m, tile // num_m, K, BLOCK_M, BLOCK_N, BLOCK_K, STAGES,
                      False)


def tma_launcher(kind, x, w, y, bm, bn, bk, stages, warps, num_sms, m_fastest=True):
    """Descriptors built once (as a CUDA graph would bake them in); returns the launch of a tile-per-program
    kernel ("plain", "ws": its K loop warp-specialized) or of persistent programs ("persistent",
    "persistent_ws": the tile loop warp-specialized)."""
    m, k = x.shape
    n = w.shape[0]
    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    yd = TensorDescriptor.from_tensor(y, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if kind in ("plain", "ws"):
        def launch() -> None:
            _tma_gemm_kernel[(tiles,)](xd, wd, yd, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
                                       M_FASTEST=m_fastest, WS=kind == "ws", num_warps=warps)
        return launch
    programs = min(num_sms, tiles)

    def launch_persistent() -> None:
        _tma_gemm_persistent_kernel[(programs,)](xd, wd, yd, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                                 STAGES=stages, NUM_PROGRAMS=programs,
                                                 WS=kind == "persistent_ws", num_warps=warps)
    return launch_persistent


CONFIGS = [(bm, bn, bk, st, wp, mf)
           for bm, bn, wp in ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8), (128, 128, 8), (64, 256, 8),
                              (128, 256, 8))
           for bk, st in ((64, 4), (128, 3))
           for mf in (True,)]
SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--kinds", default="plain", help="comma list of plain, ws, persistent, persistent_ws")
    parser.add_argument("--rows", default="128,256")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    rows = []
    for name, k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float())
            base = do_bench(lambda x=x, w=w: F.linear(x, w), warmup=10, rep=50)
            rows.append({"layer": name, "m": m, "variant": "cublas", "ms": base, "rel_err": None})
            print(f"{name:<8} m={m:<4} cublas {1e3 * base:7.1f} us {2 * m * n * k / base / 1e9:5.0f} TF", flush=True)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            for (bm, bn, bk, st, wp, mf), kind in ((c, kind) for kind in kinds for c in CONFIGS):
                label = f"{'' if kind == 'plain' else kind + '_'}m{bm}_n{bn}_k{bk}_s{st}_w{wp}"
                try:
                    launch = tma_launcher(kind, x, w, y, bm, bn, bk, st, wp, num_sms, mf)
                    y.fill_(float("nan"))
                    launch()
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    ms = do_bench(launch, warmup=10, rep=50)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record and go on
                    print(f"{name} m={m} {label}: {exc}".splitlines()[0], flush=True)
                    continue
                rows.append({"layer": name, "m": m, "variant": label, "ms": ms, "rel_err": err})
                print(f"{name:<8} m={m:<4} {label:<22} {1e3 * ms:7.1f} us {2 * m * n * k / ms / 1e9:5.0f} TF "
                      f"({base / ms:.2f}x cublas) err {err:.1e}", flush=True)
    write_record(Path(args.out) / f"gemm_tma_probe_{'_'.join(kinds)}_{dt.date.today().isoformat()}.json",
                 "gemm_tma_probe", triton=triton.__version__, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
