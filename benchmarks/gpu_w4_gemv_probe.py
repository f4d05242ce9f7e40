"""Probe of the W4A16 GEMV variants (kernels/w4_gemv.py) and the tensor-core GEMM on the same K-major layout
(kernels/w4_kmajor_gemm.py; from 16 rows also its transposed product, ``w_lhs``: codes as the left operand, in
Triton and in Gluon, kernels/w4_kmajor_gluon.py) and
dequantize + cuBLAS (kernels/w4_kmajor_dequant.py, from 8 rows) on Llama-3-8B's
projections (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336; 4-bit, group 128, integer zero points
as RTN writes them) at 1, 2, 4, 8, 16, 32, 64, 128 and 256 rows, against
cuBLAS bf16 and today's dispatched kernel (kernels/quant_dispatch.py's choice; on a GPU its shipped table does not
list, e.g. an H200, the H100's entry), all in one run: issue 20's batch-1 target is W4A16 >= 2.5x bf16. The
totals' ``k_major`` column is what serving one K-major copy would give at each row count (the best of the K-major
GEMV, GEMM and dequantize + cuBLAS a shape; ``kmajor_gemm`` and ``dequant`` the best of each of those two alone,
``w_lhs`` the transposed product's best alone, ``gluon`` its Gluon kernels', ``ring`` the pipelined Gluon
kernel's, kernels/w4_kmajor_gluon_ring.py, from 64 rows).
Dequantize + cuBLAS runs through kernels/quant_dispatch.py's ``kmajor_cuda_linear`` with its config as the plan:
the engine's call, its dense copy allocated every call as there (from the graph's pool when captured).

Every variant is first checked against the fp32 product of x and the dequantized weight on fresh random inputs
(norm-relative and max error recorded; one that fails to compile or to match is recorded and not timed, and the
probe goes on). Timing as benchmarks/gpu_quant_gemv_sweep.py (its helpers): one CUDA graph runs the projection
once per weight copy over 32 copies (never served from L2), replays timed with CUDA events, median; µs per call;
% of the byte floor (codes + scales + zero points over 3.0 TB/s).

    OUT=$OUT python3 benchmarks/gpu_w4_gemv_probe.py --time-limit 170    # H100, < 3.5 min in all

It writes $OUT/gpu_w4_gemv_probe.json (every measurement, failures, the totals, suggested table entries) and
$OUT/gpu_w4_gemv_probe.txt (the full table); the console keeps the fastest three variants a case.

``--time-limit`` counts from the start of the process: after it no new measurement starts, and the JSON (written
after every shape and row count too) lists what was skipped. ``--dry-run`` runs the whole probe on the CPU under
TRITON_INTERPRET=1 (tiny shapes with the same names, 2 weight copies, wall-clock times that mean nothing): every
variant checked against fp32, the JSON, totals and suggested entries written as on the GPU (variants the
interpreter cannot run, e.g. inline PTX or Gluon, are recorded as failures). Rows run in the order 1, 16, 8, 64, 256, 128,
32, 4, 2 so that a cut loses the least needed (past 16 rows only bf16, today's kernel, the K-major GEMM and
dequantize + cuBLAS run). Needs torch + triton only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

START = time.monotonic()

from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_probe import GemvProbe, best_per_case, finish_rows, table_lines  # noqa: E402
from gemv_probe import tag as result_tag  # noqa: E402
from gpu_quant_gemv_sweep import (  # noqa: E402
    COPIES,
    FLOOR_BYTES_PER_S,
    GROUP,
    SHAPES,
    OutOfResources,
    copy_rate_gbps,
    graph_us,
    packed_bytes,
    random_packed,
)
from gpu_record import probe_device, write_record  # noqa: E402

from tokenmill.kernels._triton import next_power_of_2  # noqa: E402
from tokenmill.kernels.quant_dispatch import (  # noqa: E402
    SHIPPED_CONFIGS,
    config_from_json,
    kmajor_cuda_linear,
    tuned_choice,
    wna16_cuda_linear,
    wna16_format,
)
from tokenmill.kernels.w4_gemv import MAX_ROWS, W4GemvConfig, repack_k_major, split_plan, w4_gemv  # noqa: E402
from tokenmill.kernels.w4_kmajor_dequant import KMajorDequantConfig, dequantize_k_major_dense  # noqa: E402
from tokenmill.kernels.w4_kmajor_gemm import KMajorGemmConfig, kmajor_gemm_block_k, w4_kmajor_gemm  # noqa: E402
from tokenmill.kernels.wna16_gemm import dequantize  # noqa: E402

ROWS = (1, 16, 8, 64, 256, 128, 32, 4, 2)
KMAJOR_GEMM_MIN_ROWS = 8
DEQUANT_MIN_ROWS = 8
DEQUANT_ALONE_ROWS = 16  # the row count at which the dequantize kernel is also timed alone (it reads no x)
K_MAJOR_KERNELS = ("w4_kmajor_gemm", "dequant_mm")  # result params' "kernel" of the K-major kinds besides the GEMV


def kmajor(n: int, g: int, w: int = 4, st: int = 2, pf: bool = False, pdl: bool = False,
           pre: int = 0) -> W4GemvConfig:
    return W4GemvConfig("kmajor", block_n=n, groups=g, num_warps=w, num_stages=st, prefetch=pf, pdl=pdl,
                        preload_steps=pre)


def nmajor(n: int, g: int, reduce: str = "finish", w: int = 4) -> W4GemvConfig:
    return W4GemvConfig("nmajor", block_n=n, groups=g, reduce=reduce, num_warps=w, num_stages=1)


def mma(n: int, g: int, reduce: str = "finish", asm: bool = False, w: int = 4, st: int = 2,
        kind: str = "mma_k") -> W4GemvConfig:
    return W4GemvConfig(kind, block_n=n, groups=g, reduce=reduce, asm=asm, num_warps=w, num_stages=st)


# The 1-row winner launched with PDL, its first chunk preloaded before the wait, and 1 or all later chunks (8: down's
# 7, the others' 1) L2-prefetched; and the whole-slice L2 prefetch without PDL. Timed here back to back (the graph's
# calls are each other's predecessors), so the PDL ones overlap the previous call's tail;
# benchmarks/gpu_w4_chain.py times them behind the decode chain's real small kernels.
PDL_VARIANTS = (kmajor(4, 16, w=2, pdl=True), kmajor(4, 16, w=2, pdl=True, pre=1),
                kmajor(4, 16, w=2, pdl=True, pre=2), kmajor(4, 16, w=2, pdl=True, pre=8), kmajor(4, 16, w=2, pre=8))


# Chosen from the SASS of sm_90 compiles without a GPU (triton 3.6, as on the device, and 3.9: instructions a
# weight in the K loop, registers, shared-memory round trips): K-major FMA 3.5-3.9 instructions a weight at 1 row,
# 2.8-4.3 a row-weight at 2-8 rows (tiles whose flat K dim holds every thread: no layout shuffle); the
# one-product tensor-core kernel ~5-6 a weight at any row count up to 16. Today's kernels, same count: the 1-row
# GEMV 10.9 a weight (two rows computed), the 2-16 row tensor-core split-K 9.1.
def candidates(rows: int) -> list[W4GemvConfig]:
    """A few configs a kind (each distinct one costs a Triton compile of ~1-3 s): FMA kinds up to 8 rows (with
    tiles shrinking as rows grow: their accumulators are per row), tensor cores at every row count."""
    tensor = [mma(128, 8, asm=True), mma(128, 8), mma(64, 4, asm=True), mma(128, 8, asm=True, w=8),
              mma(64, 4, asm=True, st=4), mma(64, 2, asm=True), mma(64, 4, kind="mma"), mma(64, 4, "atomic", asm=True)]
    fma = {1: [kmajor(4, 32), kmajor(8, 32), kmajor(4, 16, w=2), kmajor(4, 16, w=2, pf=True), nmajor(64, 2),
               nmajor(64, 2, "atomic"), *PDL_VARIANTS],
           2: [kmajor(4, 32), kmajor(2, 32), kmajor(4, 32, pdl=True, pre=8)],
           4: [kmajor(2, 32), kmajor(4, 16, w=2), kmajor(4, 16, w=2, pdl=True, pre=8)],
           8: [kmajor(2, 32)]}
    return fma.get(rows, []) + (tensor if rows <= MAX_ROWS else [])


def kmgemm(m: int, n: int, k: int, split: int, w: int = 4, st: int = 3, sc: bool = False, runs: bool = True,
           one: bool = True) -> KMajorGemmConfig:
    return KMajorGemmConfig(m, n, k, split, one, w, st, runs, sc)


# Chosen from sm_90 compiles without a GPU (triton 3.6, as on the device, and 3.9): none spills on 3.6 (the
# post-product scaling at 64 x 64 with 4 warps did: two fp32 tiles); K-loop SASS at 16 rows, thread instructions a
# weight: one product a nibble 5.0 (n128) / 6.4 (n64), one product a step 9.2 (today's 2-16 row kernel: 9.1).
def kmajor_gemm_candidates(rows: int) -> list[KMajorGemmConfig]:
    """The K-major tensor-core GEMM's configs for ``rows`` (none under 8 rows: the K-major GEMV serves those)."""
    if rows < KMAJOR_GEMM_MIN_ROWS:
        return []
    if rows <= 16:
        return [kmgemm(16, 128, 128, 8, runs=False, one=False), kmgemm(16, 64, 128, 8, runs=False, one=False),
                kmgemm(16, 64, 128, 8), kmgemm(16, 64, 128, 8, sc=True)]
    if rows <= 64:
        return [kmgemm(64, 64, 128, 4, w=8), kmgemm(64, 64, 128, 4, sc=True), kmgemm(64, 128, 64, 2, sc=True),
                kmgemm(32, 64, 128, 4)]
    return [kmgemm(128, 128, 64, 1, w=8, sc=True), kmgemm(128, 128, 64, 2, w=8, st=4, sc=True),
            kmgemm(64, 128, 128, 2, sc=True), kmgemm(64, 256, 64, 1, w=8, sc=True)]


def wlhs(m: int, n: int, k: int, split: int, w: int = 4, st: int = 3, sc: bool = False,
         gluon: bool = False) -> KMajorGemmConfig:
    return KMajorGemmConfig(m, n, k, split, True, w, st, False, sc, w_lhs=True, gluon=gluon)


def wlg(m: int, n: int, k: int, split: int, w: int) -> KMajorGemmConfig:
    return wlhs(m, n, k, split, w, gluon=True)


def ring(m: int, n: int, k: int, split: int, st: int = 4, wr: bool = False, pair: bool = False,
         ra: bool = False, finish: int = 0) -> KMajorGemmConfig:
    """kernels/w4_kmajor_gluon_ring.py's pipelined Gluon kernel (8 warps: two warpgroups of 64 channels); ``wr``:
    the words ride the cp.async ring too (``weight_ring``); ``pair``: two codes a bf16x2 register
    (``pair_dequant``); ``ra``: the codes as the wgmma's register operand (``register_a``); ``finish``: the last
    split sums that many channels at a time (``finish_rows``)."""
    return KMajorGemmConfig(m, n, k, split, True, 8, st, False, w_lhs=True, gluon=True, pipelined=True,
                            weight_ring=wr, pair_dequant=pair, register_a=ra, finish_rows=finish)


# H100, s25, 64 rows: register_a won every shape (four projections 130.9 us vs bf16 162.5), but qkv and o, with
# 48 and 32 output tiles, stayed below bf16 at split 2 / 4: split 8 (250 registers, no spills, no wgmma operand
# hazards in sm_90 compiles) gives them 256-384 programs.
# The words ring (weight_ring): at 64 rows the register-prefetched kernels stream the weights at ~0.56 TB/s (one
# step, ~8 KB a CTA, in flight); the ring keeps num_stages - 2 steps of words in flight. pair_dequant: the K loop
# of the 64 x 128 x 128 tile from 471 SASS instructions to 316 (bf16x2 arithmetic instead of fp32); register_a: 281
# a step (562 for the loop's two), no codes through shared memory (at 64 rows the A tile's store and wgmma read were
# ~64 of ~128 KB of shared-memory traffic a step). sm_90 compiles
# (triton 3.9, no GPU): 73-254 registers, no spills (128-row tiles split over K spill, so they are not listed: 64-row
# tiles split in two fill the SMs at 128-256 rows on the 4096-channel projections, 32 channel tiles each). s26:
# finish_rows 32 (the split-K sum in channel chunks) lets 128- and 256-row tiles split without spills (194-250
# registers), and takes the 64-row split-8 tile from 250 registers to 162.
def weight_ring_candidates(rows: int) -> list[KMajorGemmConfig]:
    if rows < 64:
        return []
    if rows <= 64:
        return [ring(64, 128, 128, 1, 4, True), ring(64, 128, 128, 2, 4, True), ring(64, 128, 128, 1, 4, True, True),
                ring(64, 128, 128, 2, 4, True, True), ring(64, 128, 128, 2, 5, True, True),
                ring(64, 128, 128, 4, 4, True, True), ring(64, 128, 64, 2, 6, True, True),
                ring(64, 128, 128, 2, 4, True, True, True), ring(64, 128, 128, 4, 4, True, True, True),
                ring(64, 128, 64, 2, 6, True, True, True), ring(64, 128, 128, 8, 4, True, True, True),
                ring(64, 128, 64, 8, 6, True, True, True), ring(64, 128, 128, 4, 4, True, True, True, 32),
                ring(64, 128, 128, 8, 4, True, True, True, 32)]
    if rows <= 128:
        return [ring(128, 128, 128, 1, 4, True), ring(128, 128, 128, 1, 4, True, True),
                ring(128, 128, 64, 1, 5, True, True), ring(64, 128, 128, 2, 4, True, True),
                ring(128, 128, 128, 1, 4, True, True, True), ring(64, 128, 128, 2, 4, True, True, True),
                ring(64, 128, 128, 4, 4, True, True, True), ring(128, 128, 128, 2, 4, True, True, True, 32),
                ring(64, 128, 128, 4, 4, True, True, True, 32)]
    # s26 (H100, 256 rows): the 128- and 256-row tiles give down / o (32 channel tiles) 32-64 programs, and lost to
    # the table's entries there; the 64-row tiles split over K (256-512 programs) with the codes in registers.
    return [ring(256, 128, 64, 1, 4, True, True), ring(128, 128, 128, 1, 4, True, True),
            ring(64, 128, 128, 2, 4, True, True), ring(256, 128, 64, 1, 4, True, True, True),
            ring(128, 128, 128, 1, 4, True, True, True), ring(64, 128, 128, 2, 4, True, True, True),
            ring(64, 128, 128, 4, 4, True, True, True), ring(128, 128, 128, 2, 4, True, True, True, 32),
            ring(128, 128, 128, 4, 4, True, True, True, 32), ring(256, 128, 64, 2, 4, True, True, True, 32),
            ring(256, 128, 64, 4, 4, True, True, True, 32)]


# The transposed product (w_lhs: codes the left operand, n the tensor cores' M; the config's block_m is their N).
# From sm_90 compiles without a GPU (triton 3.6), none of these spills. Triton's compile (w_lhs): 128-255 registers
# (243-255 from 64 rows) and the codes still reach the tensor cores through shared memory (stored, then reloaded
# with ldmatrix; K loop 551-1026 SASS instructions vs 363-661 for the W-right kernel's configs), so only a few are
# timed. Gluon's (gluon, kernels/w4_kmajor_gluon.py: codes built in the operand's registers, no shared trip): K loop
# 257-559 instructions, 126-255 registers. 20 configs a shape in all (10 distinct compiles each kind), so the probe
# keeps near --time-limit 140 on the H100 (rows 4 and 2, last, are the ones a cut would lose). From 64 rows the
# pipelined Gluon kernel (ring: cp.async x ring, async wgmma, codes via shared memory) replaces the configs that never
# won there on the H100 (s19); sm_90 compiles (triton 3.6): 166-252 registers, no spills for these (split-K at
# 256-row tiles, or at 128 x 128 steps, spills: its epilogue holds a second tile, so none of those are listed).
def w_lhs_candidates(rows: int) -> list[KMajorGemmConfig]:
    """The transposed-product GEMM's configs for ``rows`` (16 rows and up), Triton's then Gluon's."""
    if rows < 16:
        return []
    if rows <= 16:
        return [wlhs(16, 64, 128, 8), wlg(16, 64, 128, 8, 4), wlg(16, 128, 128, 8, 8)]
    if rows <= 32:
        return [wlhs(32, 64, 128, 4), wlg(32, 64, 128, 4, 4), wlg(32, 128, 128, 4, 8)]
    if rows <= 64:
        return [wlhs(64, 64, 128, 4), wlg(64, 128, 128, 2, 8), wlg(64, 128, 128, 4, 8), wlg(64, 128, 64, 1, 8),
                wlg(64, 64, 128, 1, 4), ring(64, 128, 128, 2), ring(64, 128, 128, 4)]
    if rows <= 128:
        return [wlhs(64, 128, 128, 2, w=8), wlg(64, 128, 128, 2, 8), wlg(64, 128, 64, 1, 8),
                ring(128, 128, 64, 1), ring(128, 128, 64, 2), ring(64, 128, 128, 2)]
    return [wlg(128, 128, 64, 1, 8), wlg(128, 128, 128, 1, 8), wlg(64, 128, 128, 2, 8), wlg(64, 128, 64, 1, 8),
            ring(256, 128, 64, 1), ring(128, 128, 64, 2), ring(128, 128, 128, 1)]


# Today's default (32 channels x one group a program, 4 warps), taller tiles with more warps (more work a program:
# sm_90 compiles without a GPU, 36-64 registers, no spills), the default walking along K (k_first: neighbouring
# programs write neighbouring 256-byte runs of the same rows, not runs 32 rows apart), and L2-sized chunks (kernels/w4_kmajor_dequant.py's
# chunk_n: a buffer of 16 or 32 MB of the H100's 50 MB L2, e.g. 2048 / 4096 channels at K=4096, 512 / 1024 at
# K=14336; at least two chunks; one reused buffer that cuBLAS reads straight after each dequantize).
L2_CHUNK_BYTES = (16 << 20, 32 << 20)


def dequant_candidates(rows: int, n: int, k: int) -> list[KMajorDequantConfig]:
    """Dequantize + cuBLAS configs for ``rows`` x ``n`` x ``k`` (none under 8 rows: the dense copy alone costs 4x
    the codes)."""
    if rows < DEQUANT_MIN_ROWS:
        return []
    chunks = sorted({min(1 << (size // (2 * k)).bit_length() - 1, n // 2) for size in L2_CHUNK_BYTES})
    return [KMajorDequantConfig(), KMajorDequantConfig(64, 8), KMajorDequantConfig(128, 8),
            KMajorDequantConfig(k_first=True), *(KMajorDequantConfig(chunk_n=c) for c in chunks if c > 0)]


def k_major(r: dict[str, Any]) -> bool:
    """Whether a result row's kernel reads the K-major repack (the GEMV's kmajor kind, the K-major GEMM or
    dequantize + cuBLAS)."""
    return r["params"].get("kind") == "kmajor" or r["params"].get("kernel") in K_MAJOR_KERNELS


# --dry-run: the same shape names (the totals add them up), sizes the interpreter runs in seconds
DRY_SHAPES = {"qkv": (96, 256), "o": (64, 256), "gate_up": (192, 256), "down": (64, 512)}
DRY_COPIES = 2


class Weights:
    """One shape's operands: ``copies`` bf16 weights, 4-bit packed ones (zero points) and their K-major repacks."""

    def __init__(self, n: int, k: int, gen: torch.Generator, copies: int = COPIES, device: str = "cuda") -> None:
        self.n, self.k = n, k
        self.dense = [(torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
                      for _ in range(copies)]
        self.packed = [random_packed(n, k, 4, True, gen, device) for _ in range(copies)]
        self.kmajor = [repack_k_major(p) for p in self.packed]
        self.dequant = dequantize(self.packed[0])  # fp32 [K, N], the reference's weight


H100 = "NVIDIA H100 80GB HBM3"  # the device the shipped table was measured on


def today_choice(x: torch.Tensor, w: Weights) -> tuple[str, dict[str, Any], dict[int, Any]]:
    """(label, params, plan) of today's kernel for x's rows: the shipped table's entry for this device, else
    (another GPU, e.g. an H200) the H100's entry passed as a plan, else the tiled kernel's default."""
    rows = x.shape[0]
    found, config = tuned_choice(x.device, wna16_format(w.packed[0]), w.n, w.k, rows)
    plan: dict[int, Any] = {}
    if not found:
        shapes = json.loads(SHIPPED_CONFIGS.read_text()).get(H100, {}).get(wna16_format(w.packed[0]), {})
        buckets = shapes.get(f"{w.n}x{w.k}", {})
        bucket = min((int(r) for r in buckets if int(r) >= rows), default=None)
        if bucket is not None:
            config = config_from_json(buckets[str(bucket)])
            plan = {next_power_of_2(rows): config}
    if config is None:
        return "today:wna16_gemm default", {"kernel": "wna16_gemm", "default": True}, plan
    return f"today:{config.name}", {"kernel": type(config).__name__, **asdict(config)}, plan


def dry_timer(batch_call) -> float:
    """--dry-run's stand-in for graph_us: µs of one call by the wall clock (the interpreter's; means nothing)."""
    start = time.perf_counter()
    outs = batch_call()
    return (time.perf_counter() - start) * 1e6 / len(outs)


def write(pr: GemvProbe, copies: int, dry_run: bool) -> None:
    finish_rows(pr.results)
    write_record(pr.out, "gpu_w4_gemv_probe", copy_rate_gbps=pr.copy_rate, floor_bytes_per_s=FLOOR_BYTES_PER_S,
                 copies=copies, dry_run=dry_run, group_size=GROUP, results=pr.results,
                 best=best_per_case(pr.results, list(SHAPES)), decode_totals=decode_totals(pr.results),
                 suggested_table={"w4a16_g128": suggested_entries(pr.results),
                                  "w4a16_g128_kmajor": suggested_k_major_entries(pr.results)},
                 failures=pr.failures,
                 skipped=pr.skipped, fatal=pr.fatal, wall_s=time.monotonic() - START)


def table(pr: GemvProbe, top: int | None = None) -> list[str]:
    return table_lines(pr.results, list(SHAPES), "pct_of_floor", "%floor", top)


FAMILIES = ("gemv", "kmajor", "w_lhs", "weight_ring", "dequant")  # --families: the candidate lists probe_case times


def probe_case(pr: GemvProbe, shape: str, w: Weights, rows: int, gen: torch.Generator,
               families: tuple[str, ...] = FAMILIES) -> None:
    x = torch.randn(rows, w.k, device=w.dense[0].device, generator=gen).to(torch.bfloat16)
    ref = x.float() @ w.dequant
    case = {"shape": shape, "rows": rows, "n": w.n, "k": w.k, "floor_bytes": packed_bytes(w.packed[0])}
    bf16 = {**case, "floor_bytes": w.dense[0].nbytes}
    pr.measure(bf16, "bf16:cublas", {"kernel": "cublas"}, lambda: F.linear(x, w.dense[0]),
               lambda: [F.linear(x, d) for d in w.dense], None)
    label, params, plan = today_choice(x, w)
    pr.measure(case, label, params, lambda: wna16_cuda_linear(x, w.packed[0], None, plan),
               lambda: [wna16_cuda_linear(x, p, None, plan) for p in w.packed], ref)
    # the K-major layout's kernel as the shipped table picks it (this device's entry, else its architecture's):
    # the baseline the K-major candidates replace, so a probe of new K-major kinds alone is still an A/B
    pr.measure(case, "kmajor_today:table", {"kernel": "kmajor_table"},
               lambda: kmajor_cuda_linear(x, w.kmajor[0], None, {}),
               lambda: [kmajor_cuda_linear(x, p, None, {}) for p in w.kmajor], ref)
    for config in candidates(rows) if "gemv" in families else []:
        weights = w.kmajor if config.kind == "kmajor" else w.packed
        params = asdict(config)
        if config.kind != "kmajor":  # what ran: the finish workspace may have raised the groups per program
            params["groups_run"], params["splits"] = split_plan(config, rows, w.n, w.k // GROUP)
        pr.measure(case, config.name, params, lambda c=config, ws=weights: w4_gemv(x, ws[0], c),
                   lambda c=config, ws=weights: [w4_gemv(x, p, c) for p in ws], ref)
    gemms = ((kmajor_gemm_candidates(rows) if "kmajor" in families else [])
             + (w_lhs_candidates(rows) if "w_lhs" in families else [])
             + (weight_ring_candidates(rows) if "weight_ring" in families else []))
    for config in gemms:
        params = {"kernel": "w4_kmajor_gemm", **asdict(config), "block_k_run": kmajor_gemm_block_k(config, GROUP)}
        pr.measure(case, config.name, params, lambda c=config: w4_kmajor_gemm(x, w.kmajor[0], c),
                   lambda c=config: [w4_kmajor_gemm(x, p, c) for p in w.kmajor], ref)
    for config in dequant_candidates(rows, w.n, w.k) if "dequant" in families else []:
        plan = {next_power_of_2(rows): config}  # the engine's dispatch with this config chosen for these rows
        pr.measure(case, config.name, {"kernel": "dequant_mm", **asdict(config)},
                   lambda pl=plan: kmajor_cuda_linear(x, w.kmajor[0], None, pl),
                   lambda pl=plan: [kmajor_cuda_linear(x, p, None, pl) for p in w.kmajor], ref)
        if rows == DEQUANT_ALONE_ROWS and not config.chunk_n:
            dequant_alone(pr, case, w, config)
    print(f"{shape} rows={rows} done at {time.monotonic() - START:.0f} s", flush=True)


TOTAL_TAGS = ("bf16", "today", "kmajor_today", "new", "no_repack", "k_major", "kmajor_gemm", "w_lhs", "gluon", "ring",
              "dequant")


def total_tags(r: dict[str, Any]) -> list[str]:
    """The decode_totals columns a result row counts in."""
    if result_tag(r) != "new":
        return [result_tag(r)]
    if not k_major(r):
        return ["new", "no_repack"]
    kernel = r["params"].get("kernel")
    alone = {"w4_kmajor_gemm": ["kmajor_gemm"], "dequant_mm": ["dequant"]}.get(kernel, [])
    if r["params"].get("w_lhs"):  # the transposed product also alone (it counts in the K-major GEMM's best too)
        alone += ["w_lhs", "gluon"] if r["params"].get("gluon") else ["w_lhs"]
        alone += ["ring"] if r["params"].get("pipelined") else []
    return ["new", "k_major", *alone]


def dequant_alone(pr: GemvProbe, case: dict[str, Any], w: Weights, config: KMajorDequantConfig) -> None:
    """The dense copy alone (label ``part:``: a baseline-like row, never a candidate or in the totals), checked
    against the fp32 dequantized weight; its %floor is of codes + scales + zero points read and bf16 written, so it
    says how close the kernel streams to HBM speed, and the dequant rows minus it is cuBLAS's share."""
    part = {**case, "floor_bytes": case["floor_bytes"] + w.n * w.k * 2}
    pr.measure(part, f"part:{config.name}", {"kernel": "dequant_only", **asdict(config)},
               lambda: dequantize_k_major_dense(w.kmajor[0], torch.bfloat16, config),
               lambda: [dequantize_k_major_dense(p, torch.bfloat16, config) for p in w.kmajor], w.dequant.t())


def decode_totals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four projections added up per row count: bf16, today's kernel, the best new variant per shape, the
    best new variant that serves the GPTQ layout as loaded (no repack), the best K-major one (what serving
    only the repacked copy gives), and the best K-major GEMM and dequantize + cuBLAS each alone."""
    by: dict[tuple, float] = {}
    for r in results:
        for tag in total_tags(r):
            by[(r["rows"], tag, r["shape"])] = min(by.get((r["rows"], tag, r["shape"]), float("inf")), r["us"])
    totals = []
    for rows in sorted({r["rows"] for r in results}):
        sums = {tag: sum(by.get((rows, tag, s), float("nan")) for s in SHAPES)
                for tag in TOTAL_TAGS}
        totals.append({"rows": rows, **{f"{tag}_us": us for tag, us in sums.items()},
                       **{f"{tag}_x_bf16": sums["bf16"] / us for tag, us in sums.items() if tag != "bf16"}})
    return totals


def suggested_entries(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """kernels/quant_dispatch.py table entries ({"NxK": {rows: entry}}) where a new variant that serves the
    GPTQ layout as loaded beats today's kernel; the K-major kinds are left out (they need the load-time repack)."""
    today = {(r["shape"], r["rows"]): r["us"] for r in results if result_tag(r) == "today"}
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["shape"], r["rows"])
        if result_tag(r) == "new" and not k_major(r) and r["us"] < today.get(key, float("inf")):
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    table: dict[str, dict[str, Any]] = {}
    for (_, rows), r in sorted(best.items()):
        fields = {f: v for f, v in r["params"].items() if f not in ("groups_run", "splits", "kernel")}
        table.setdefault(f"{r['n']}x{r['k']}", {})[str(rows)] = {"kernel": "w4_gemv", **fields}
    return table


def suggested_k_major_entries(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Table entries for weights served in the K-major layout (--quant-weight-layout kmajor; format
    w4a16_g128_kmajor): the fastest K-major variant per shape and row count, whether or not it beats today's
    kernel (that layout has no other), but not where the K-major table's own entry (``kmajor_today``) measured
    faster: a run of a few families (H100, s26: the ring alone at 256 rows) must not replace a better entry. Row
    counts past the probe's keep kernels/quant_dispatch.py's defaults."""
    table_us = {(r["shape"], r["rows"]): r["us"] for r in results if result_tag(r) == "kmajor_today"}
    best: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["shape"], r["rows"])
        if result_tag(r) == "new" and k_major(r) and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    best = {key: r for key, r in best.items() if r["us"] < table_us.get(key, float("inf"))}
    table: dict[str, dict[str, Any]] = {}
    for (_, rows), r in sorted(best.items()):
        fields = {f: v for f, v in r["params"].items() if f not in ("groups_run", "splits", "kernel", "block_k_run")}
        kernel = r["params"]["kernel"] if r["params"].get("kernel") in K_MAJOR_KERNELS else "w4_gemv"
        table.setdefault(f"{r['n']}x{r['k']}", {})[str(rows)] = {"kernel": kernel, **fields}
    return table


def summary_lines(pr: GemvProbe) -> list[str]:
    lines = ["", "four projections added up (best new variant per shape):"]
    for t in decode_totals(pr.results):
        lines.append(f"rows {t['rows']:>3}: bf16 {t['bf16_us']:7.1f} us, today {t['today_us']:7.1f} us "
                     f"({t['today_x_bf16']:.2f}x), K-major today {t['kmajor_today_us']:7.1f} us "
                     f"({t['kmajor_today_x_bf16']:.2f}x), best new {t['new_us']:7.1f} us ({t['new_x_bf16']:.2f}x), "
                     f"best without repack {t['no_repack_us']:7.1f} us ({t['no_repack_x_bf16']:.2f}x), "
                     f"best K-major {t['k_major_us']:7.1f} us ({t['k_major_x_bf16']:.2f}x)")
        lines.append(f"{'':9} K-major GEMM alone {t['kmajor_gemm_us']:7.1f} us ({t['kmajor_gemm_x_bf16']:.2f}x), "
                     f"of it w_lhs alone {t['w_lhs_us']:7.1f} us ({t['w_lhs_x_bf16']:.2f}x), "
                     f"Gluon's alone {t['gluon_us']:7.1f} us ({t['gluon_x_bf16']:.2f}x), "
                     f"of it pipelined alone {t['ring_us']:7.1f} us ({t['ring_x_bf16']:.2f}x), "
                     f"dequantize + cuBLAS alone {t['dequant_us']:7.1f} us ({t['dequant_x_bf16']:.2f}x)")
    return lines + pr.failure_lines()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_w4_gemv_probe.json"))
    parser.add_argument("--time-limit", type=float, default=170.0,
                        help="seconds from the process start after which no new measurement starts")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--rows", default=",".join(map(str, ROWS)))
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help="candidate families to time (bf16 and today's kernel always run): " + ", ".join(FAMILIES))
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check under TRITON_INTERPRET=1: tiny shapes, wall-clock times that mean nothing")
    args = parser.parse_args()
    families = tuple(args.families.split(","))
    if unknown := set(families) - set(FAMILIES):
        parser.error(f"unknown --families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    device = probe_device(args.dry_run)
    copies, shapes = (DRY_COPIES, DRY_SHAPES) if args.dry_run else (COPIES, SHAPES)
    timer = dry_timer if args.dry_run else graph_us
    pr = GemvProbe(START, args.time_limit, Path(args.out), timer,
                   lambda case, us: 100 * case["floor_bytes"] / FLOOR_BYTES_PER_S / (us * 1e-6), "pct_of_floor",
                   (OutOfResources,))
    if not args.dry_run:
        pr.copy_rate = copy_rate_gbps()
    gen = torch.Generator(device=device).manual_seed(0)
    pr.run(lambda: {shape: Weights(*shapes[shape], gen, copies, device) for shape in args.shapes.split(",")},
           [int(r) for r in args.rows.split(",")], lambda p, shape, w, rows: probe_case(p, shape, w, rows, gen, families),
           lambda p: write(p, copies, args.dry_run))
    full = table(pr) + summary_lines(pr)
    pr.out.with_suffix(".txt").write_text("\n".join(full) + "\n")
    print("\n".join(table(pr, top=3) + summary_lines(pr)))  # the console keeps the fastest three
    print("suggested w4a16_g128 entries (no repack):", json.dumps(suggested_entries(pr.results), sort_keys=True))
    print("suggested w4a16_g128_kmajor entries:", json.dumps(suggested_k_major_entries(pr.results), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
