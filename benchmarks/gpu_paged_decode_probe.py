"""Probe of the paged decode kernel's launch configs (kernels/paged_decode_config.py) on issue 22's shapes: Llama-3-8B
attention (32 query heads, 8 KV heads, head dim 128, block size 16 as the engine uses), batch 950 with contexts
uniform in [128, 254] (max load, 128 -> 128) over an FP8 (e4m3, per-tensor scales) and a bf16 cache, batch 256 with
~540-token contexts, batch 1 with 4096 tokens and batch 600 with ~1000 (both dtypes): today's launch
(``DecodeConfig()``) against packed sequences, the FP8 widening modes, tile/warp/stage choices and the head-first
grid.

Every variant is first checked against the fp32 reference (``paged_decode_reference``, on 128 of the batch's
sequences: the first 96 and the last 32, so the last, short pack is among them) on fresh random inputs (a variant
that fails to compile or to match is recorded, not timed, and the probe goes on). Timing: one CUDA graph runs the
decode once per block-table copy (copies over disjoint cache blocks, at least 256 MB read a replay, so no replay is
served from the 50 MB L2; the max-load shapes read 371 MB (FP8) / 742 MB (bf16) in one call), replays timed with
CUDA events, median of 30; µs per call; % of the byte floor: K/V bytes of the real lengths + query + output over
the copy rate measured in the same run (read + write, as benchmarks/gpu_quant_gemv_sweep.py measures it).

    python3 benchmarks/gpu_paged_decode_probe.py --out $OUT/gpu_paged_decode_probe.json \
        --configs-out $OUT/paged_decode.json            # H100: < 150 s (mostly Triton compiles)

The JSON holds every measurement, failures, the best config per shape and the table: per shape, its winner where it
beat today's launch by more than --min-gain (else today's launch), keyed {device: {"fp8" | "16bit": {batch: config}}}
as kernels/paged_decode_config.py reads it (the largest key <= a step's batch serves it; a winner at batch B > 1 is
keyed at B // 2, batch 1's serves batch 1 only: ``table_bucket``); adopt it by copying it to tokenmill/kernels/configs/paged_decode.json
(or point TOKENMILL_PAGED_DECODE_CONFIGS at it). ``--dry-run`` runs everything on the CPU under TRITON_INTERPRET=1
(tiny shapes with the same names, fp16 queries: the interpreter mis-computes bf16 products; "asm" runs as "f16"
there; wall-clock times that mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

START = time.monotonic()

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_probe import GemvProbe  # noqa: E402
from gpu_record import probe_device, write_record  # noqa: E402

from tokenmill.kernels.paged_attention import paged_decode, paged_decode_reference, plan_for_config  # noqa: E402
from tokenmill.kernels.paged_decode_config import DecodeConfig, kv_format  # noqa: E402

HEADS = (32, 8, 128)  # query heads, KV heads, head dim (Llama-3-8B)
DRY_HEADS = (8, 2, 64)  # --dry-run: the interpreter runs every program of the grid one after another
BS = 16  # the engine's block size (CacheConfig default)
MIN_READ_BYTES = 256 << 20  # per graph replay: several times the H100's 50 MB L2
CHECK_HEAD, CHECK_TAIL = 96, 32  # sequences checked against the fp32 reference
NOMINAL_COPY_GBPS = 3000.0  # --dry-run only (no GPU to measure)


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    min_len: int
    max_len: int
    kv: str  # "fp8" | "bf16"


SHAPES = [
    Shape("maxload_fp8", 950, 128, 254, "fp8"),
    Shape("maxload_bf16", 950, 128, 254, "bf16"),
    Shape("b256_l540_bf16", 256, 524, 556, "bf16"),
    Shape("b1_l4096_bf16", 1, 4096, 4096, "bf16"),
    Shape("b256_l540_fp8", 256, 524, 556, "fp8"),
    Shape("b1_l4096_fp8", 1, 4096, 4096, "fp8"),
    # Long contexts at a large batch (last: a time-limit cut loses them first): does a max-load winner hold there?
    Shape("b600_l1000_fp8", 600, 900, 1100, "fp8"),
    Shape("b600_l1000_bf16", 600, 900, 1100, "bf16"),
]
DRY_SHAPES = [Shape(s.name, b, lo, hi, s.kv) for s, (b, lo, hi) in
              zip(SHAPES, [(9, 5, 40), (9, 5, 40), (3, 60, 70), (1, 150, 150), (3, 60, 70), (1, 150, 150),
                           (9, 40, 90), (9, 40, 90)], strict=True)]


def c(**kw: Any) -> DecodeConfig:
    return DecodeConfig(**kw)


# From sm_90 compiles without a GPU (triton 3.6 as on the device; 3.9 within a few %), SASS instructions of the key
# loop a tile, registers, programs an SM (registers / shared memory): FP8 today (bn64_w4_s2) 1002, 168, 3: Triton
# gathers FP8 bytes out of shared memory one by one for the transposed V operand; "f16" 773, 168, 3; "direct" 967;
# "asm" (PTX e4m3x2 -> f16x2 Triton cannot reorder: the widened tile takes the bf16 path) 421, 128, 4; bn32_w2 asm
# 434, 128, 7. bf16 today 466, 120, 4. Packing, tile-aligned (the default pack_keys): FP8 asm pack4 489, 144, 3;
# pack2 466, 142, 3; bf16 pack4 511, 168, 3; pack2 495, 122, 4: one pipelined K/V stream over the pack's sequences
# and one set-up for them. As one dense run ("run": no part-empty last tiles, ~15% of the tiles at contexts 128-254
# with 64-key tiles, but a per-key sequence map): FP8 asm pack4 596, bf16 737.
FP8_UNSPLIT = [
    c(kv_convert="f16"), c(kv_convert="direct"), c(kv_convert="asm"), c(kv_convert="asm", num_stages=1),
    c(kv_convert="asm", num_stages=3), c(kv_convert="asm", block_n=32, num_warps=2),
    c(kv_convert="asm", block_n=32, num_warps=2, num_stages=3), c(kv_convert="asm", block_n=32, num_stages=3),
    c(kv_convert="asm", block_n=128, num_warps=8), c(kv_convert="asm", heads_fastest=True),
    c(kv_convert="asm", seqs_per_program=2), c(kv_convert="asm", seqs_per_program=4),
    c(kv_convert="asm", seqs_per_program=4, num_stages=3), c(kv_convert="asm", seqs_per_program=4, block_n=32, num_warps=2),
    c(kv_convert="asm", seqs_per_program=4, heads_fastest=True), c(kv_convert="asm", seqs_per_program=4, pack_keys="run"),
]
BF16_UNSPLIT = [
    c(seqs_per_program=2), c(seqs_per_program=4), c(seqs_per_program=4, num_stages=3),
    c(seqs_per_program=4, block_n=32, num_warps=2), c(block_n=32, num_warps=2), c(num_stages=3),
    c(heads_fastest=True), c(seqs_per_program=2, heads_fastest=True), c(seqs_per_program=4, pack_keys="run"),
    c(block_n=128, num_warps=8),
]
# Split plans (small batches): also a smaller floor on a split's keys (min_partition 64: a short context spreads
# over more programs).
BF16_SPLIT = [c(block_n=32, num_warps=2), c(num_stages=3), c(block_n=128, num_warps=8), c(min_partition=64)]
FP8_SPLIT = [c(kv_convert="asm"), c(kv_convert="asm", num_stages=3), c(kv_convert="asm", block_n=32, num_warps=2),
             c(kv_convert="f16"), c(kv_convert="asm", num_stages=3, min_partition=64)]


def candidates(shape: Shape, num_kv_heads: int, num_sms: int) -> list[DecodeConfig]:
    """Today's launch first, then the variants for the shape's dtype and plan (packing needs an unsplit plan)."""
    unsplit = shape.batch * num_kv_heads >= num_sms
    if shape.kv == "fp8":
        return [DecodeConfig(), *(FP8_UNSPLIT if unsplit else FP8_SPLIT)]
    return [DecodeConfig(), *(BF16_UNSPLIT if unsplit else BF16_SPLIT)]


class Case:
    """One shape's inputs: a cache of ``copies`` disjoint block sets, one table each, random lengths and queries."""

    def __init__(self, shape: Shape, heads: tuple[int, int, int], device: str, query_dtype: torch.dtype,
                 seed: int) -> None:
        self.shape = shape
        self.num_heads, self.num_kv_heads, self.head_dim = heads
        hq, hkv, d = heads
        gen = torch.Generator().manual_seed(seed)  # lengths and block order
        lens = torch.randint(shape.min_len, shape.max_len + 1, (shape.batch,), generator=gen)
        self.blocks_per_seq = -(-shape.max_len // BS)
        self.kv_dtype = torch.float8_e4m3fn if shape.kv == "fp8" else query_dtype  # bf16 (fp16 in --dry-run)
        element = 1 if shape.kv == "fp8" else 2
        self.kv_bytes = int(lens.sum()) * hkv * d * 2 * element
        self.floor_bytes = self.kv_bytes + 2 * shape.batch * hq * d * 2  # + query and output (bf16)
        self.copies = 1 if device == "cpu" else max(1, min(64, -(-MIN_READ_BYTES // self.kv_bytes)))
        per_copy = shape.batch * self.blocks_per_seq
        order = torch.randperm(per_copy * self.copies, generator=gen)
        self.tables = [order[i * per_copy:(i + 1) * per_copy].view(shape.batch, -1).int().to(device)
                       for i in range(self.copies)]
        blocks = per_copy * self.copies
        values = torch.Generator(device).manual_seed(seed)  # on the GPU: the max-load caches are 0.4-2 GB of fp32
        kv = torch.randn(2, blocks, BS, hkv, d, generator=values, device=device)
        if shape.kv == "fp8":  # stored = value / scale: values ~N(0, 1) sit at ~100 in e4m3
            self.scales = (torch.tensor(0.0113, device=device), torch.tensor(0.0087, device=device))
            self.cache = (kv / 0.01).clamp(-448, 448).to(self.kv_dtype)
        else:
            self.scales = (None, None)
            self.cache = kv.to(self.kv_dtype)
        del kv
        self.lens = lens.int().to(device)
        self.query = torch.randn(shape.batch, hq, d, generator=values, device=device).to(query_dtype)
        self.out = torch.empty_like(self.query)
        idx = sorted(set(range(min(CHECK_HEAD, shape.batch))) | set(range(max(0, shape.batch - CHECK_TAIL), shape.batch)))
        self.check_rows = torch.tensor(idx, device=device)
        t = self.tables[0][self.check_rows]
        self.ref = paged_decode_reference(self.query[self.check_rows].float(), self.cache, t,
                                          self.lens[self.check_rows], d**-0.5, 1, *self.scales)

    def run(self, config: DecodeConfig, table: torch.Tensor, num_sms: int) -> torch.Tensor:
        """The engine's call (kernels run with the plan triton_backend would make for this table)."""
        plan = plan_for_config(config, self.shape.batch, self.num_kv_heads, table.shape[1] * BS, num_sms)
        return paged_decode(self.query, self.cache, table, self.lens, self.head_dim**-0.5, plan=plan, out=self.out,
                            k_scale=self.scales[0], v_scale=self.scales[1], config=config)


def graph_timer(reps: int):
    from gpu_pdl_probe import time_graph

    return lambda batch_call, copies: time_graph(batch_call, reps) / copies


def wall_timer(batch_call, copies: int) -> float:
    """--dry-run's stand-in: µs of one call by the wall clock (the interpreter's; means nothing)."""
    t0 = time.perf_counter()
    batch_call()
    return 1e6 * (time.perf_counter() - t0) / copies


def probe_shape(pr: GemvProbe, case: Case, num_sms: int) -> None:
    shape = case.shape
    info = {"shape": shape.name, "rows": shape.batch, "kv": shape.kv, "floor_bytes": case.floor_bytes,
            "kv_bytes": case.kv_bytes, "copies": case.copies}
    for config in candidates(shape, case.num_kv_heads, num_sms):
        label = f"today:{config.name}" if config == DecodeConfig() else config.name
        pr.measure(
            info, label, config.to_json(),
            lambda cfg=config: case.run(cfg, case.tables[0], num_sms)[case.check_rows],
            lambda cfg=config: [case.run(cfg, t, num_sms) for t in case.tables],
            case.ref,
        )
        if pr.results and pr.results[-1]["variant"] == label and pr.results[-1]["shape"] == shape.name:
            r = pr.results[-1]
            print(f"{shape.name:15} {label:32} {r['us']:9.2f} us {r['pct_of_floor']:6.1f}% of floor "
                  f"rel {r['rel_err']:.1e}", flush=True)


def best_rows(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per shape: today's row, the fastest row and its speedup over today."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["shape"] for r in results):
        rows = [r for r in results if r["shape"] == name]
        today = next((r for r in rows if r["variant"].startswith("today:")), None)
        best = min(rows, key=lambda r: r["us"])
        out[name] = {"kv": best["kv"], "batch": best["rows"], "best": best["variant"], "best_us": best["us"],
                     "best_pct_of_floor": best["pct_of_floor"], "config": best["params"],
                     "today_us": today["us"] if today else None,
                     "today_pct_of_floor": today["pct_of_floor"] if today else None,
                     "speedup_vs_today": today["us"] / best["us"] if today else None}
    return out


def table_bucket(batch: int) -> int:
    """The table key a winner measured at ``batch`` goes under: the lookup serves it from there up to the next key.
    Batch 1 stays batch 1 (today's launch from 2 on, unmeasured); a larger batch's winner also serves down to half
    that batch (a max-load step's batch drifts below the measured one as requests finish; at half of it packed
    programs still fill the SMs several times over)."""
    return 1 if batch == 1 else max(2, batch // 2)


def table(best: dict[str, dict[str, Any]], device_name: str, min_gain: float) -> dict[str, Any]:
    """The config table: each shape's winner where it beat today's launch by more than ``min_gain`` (else today's
    launch), under ``table_bucket`` of its batch; batches below every measured bucket but 1 get today's launch."""
    entries: dict[str, dict[str, Any]] = {}
    for b in best.values():
        keep = b["speedup_vs_today"] is not None and b["speedup_vs_today"] > 1 + min_gain
        config = DecodeConfig.from_json(b["config"]) if keep else DecodeConfig()
        fmt = kv_format(torch.float8_e4m3fn if b["kv"] == "fp8" else torch.bfloat16)
        entries.setdefault(fmt, {})[str(table_bucket(b["batch"]))] = config.to_json()
    for fmt_entries in entries.values():
        if "1" in fmt_entries:
            fmt_entries.setdefault("2", DecodeConfig().to_json())
    return {device_name: entries}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON of every measurement")
    parser.add_argument("--configs-out", help="write the config table (kernels/configs/paged_decode.json's format)")
    parser.add_argument("--time-limit", type=float, default=140.0, help="seconds from start; no new work after")
    parser.add_argument("--min-gain", type=float, default=0.03, help="a winner enters the table past this speedup")
    parser.add_argument("--shapes", default="", help="comma-separated shape names (default: all)")
    parser.add_argument("--reps", type=int, default=30, help="graph replays a measurement (median)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check under TRITON_INTERPRET=1: tiny shapes, wall-clock times that mean nothing")
    args = parser.parse_args()
    device = probe_device(args.dry_run)
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = [s for s in shapes if s.name in wanted]
    timer = wall_timer if args.dry_run else graph_timer(args.reps)
    num_sms = 8 if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    device_name = "cpu" if args.dry_run else torch.cuda.get_device_name()

    def pct(case: dict[str, Any], us: float) -> float:
        return 100 * case["floor_bytes"] / (pr.copy_rate * 1e9) / (us * 1e-6)

    out = Path(args.out)
    pr = GemvProbe(START, args.time_limit, out, lambda fn: fn, pct, "pct_of_floor")
    if args.dry_run:
        pr.copy_rate = NOMINAL_COPY_GBPS
    else:
        from gpu_quant_gemv_sweep import copy_rate_gbps

        pr.copy_rate = copy_rate_gbps()
    print(f"{device_name}: copy rate {pr.copy_rate:.0f} GB/s; {len(shapes)} shapes", flush=True)

    def write() -> None:
        best = best_rows(pr.results)
        tab = table(best, device_name, args.min_gain)
        write_record(out, "gpu_paged_decode_probe", device=device_name, copy_rate_gbps=pr.copy_rate,
                     dry_run=args.dry_run, min_gain=args.min_gain, reps=args.reps,
                     shapes=[s.__dict__ for s in shapes], best=best, table=tab, results=pr.results,
                     failures=pr.failures, skipped=pr.skipped, fatal=pr.fatal,
                     elapsed_s=time.monotonic() - START)
        if args.configs_out:
            Path(args.configs_out).write_text(json.dumps(tab, indent=1, sort_keys=True) + "\n")

    query_dtype = torch.float16 if args.dry_run else torch.bfloat16
    try:
        for shape in shapes:
            if pr.over_time():
                pr.skipped.append(f"{shape.name}: time limit")
                continue
            case = Case(shape, DRY_HEADS if args.dry_run else HEADS, device, query_dtype, seed=22 + len(pr.results))
            # GemvProbe times batch_call through its timer(fn); ours also needs the copy count.
            pr.timer = lambda fn, copies=case.copies: timer(fn, copies)
            probe_shape(pr, case, num_sms)
            del case
            if not args.dry_run:
                torch.cuda.empty_cache()
            write()
    except Exception as exc:  # keep what was measured
        pr.fatal = pr.fatal or f"{type(exc).__name__}: {exc}"
        raise
    finally:
        write()
        for name, b in best_rows(pr.results).items():
            print(f"BEST {name:15} {b['best']:32} {b['best_us']:9.2f} us {b['best_pct_of_floor']:6.1f}% of floor; "
                  f"today {b['today_us'] or float('nan'):9.2f} us {b['today_pct_of_floor'] or float('nan'):6.1f}%; "
                  f"x{b['speedup_vs_today'] or float('nan'):.2f}", flush=True)
        for line in pr.failure_lines():
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
