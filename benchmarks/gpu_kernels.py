"""Check and time tokenmill's Triton kernels on a CUDA GPU against their torch references and torch SDPA.

Measures the two ceilings first (device copy bandwidth, bf16 matmul rate), then for every kernel: relative
error vs an fp32 reference (bf16 and fp16, fresh random inputs, poisoned outputs) and median time, reported
as achieved bandwidth / FLOP rate and % of the measured ceiling. Writes JSON; prints a table last.

    python benchmarks/gpu_kernels.py --out $OUT            # full run (~3-4 min on an H100)
"""

# ruff: noqa: B023  (every lambda here is timed at once, inside the loop iteration that binds its names)
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from tokenmill.attention.metadata import AttentionMetadata  # noqa: E402
from tokenmill.kernels.activation import silu_and_mul_reference, silu_and_mul_triton  # noqa: E402
from tokenmill.kernels.kv_cache_write import reshape_and_cache, reshape_and_cache_reference  # noqa: E402
from tokenmill.kernels.paged_attention import (  # noqa: E402
    DecodePlan,
    paged_decode,
    paged_decode_reference,
    plan_decode,
)
from tokenmill.kernels.prefill_attention import prefill_attention, prefill_attention_reference  # noqa: E402
from tokenmill.kernels.rms_norm import rms_norm_reference, rms_norm_triton  # noqa: E402
from tokenmill.kernels.rotary import (  # noqa: E402
    apply_rotary_reference,
    apply_rotary_triton,
    build_cos_sin_cache,
    rope_inv_freq,
)

DEV = "cuda"
# Llama-3-8B attention shape (per layer).
HQ, HKV, D, BS = 32, 8, 128, 16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def median_ms(fn: Callable[[], object], graph: bool = False) -> float:
    if graph:
        return float(do_bench_cudagraph(fn, rep=100, return_mode="median"))
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def try_median_ms(fn: Callable[[], object], graph: bool = False) -> float | None:
    """Baselines may not support a shape or graph capture; record that instead of aborting the run."""
    try:
        return median_ms(fn, graph)
    except RuntimeError as exc:
        print(f"baseline failed: {exc}".splitlines()[0], flush=True)
        return None


class Report:
    def __init__(self) -> None:
        self.checks: list[dict] = []
        self.timings: list[dict] = []
        self.ceilings: dict[str, float] = {}

    def check(self, kernel: str, dtype: torch.dtype, shape: str, err: float, tol: float = 1e-2) -> None:
        ok = err <= tol
        self.checks.append(
            {
                "kernel": kernel,
                "dtype": str(dtype).removeprefix("torch."),
                "shape": shape,
                "rel_err": err,
                "ok": ok,
            }
        )
        print(
            f"check {kernel:<22} {str(dtype):<15} {shape:<40} rel_err={err:.2e} {'ok' if ok else 'FAIL'}",
            flush=True,
        )

    def time(
        self,
        kernel: str,
        variant: str,
        shape: str,
        ms: float,
        bytes_: float = 0.0,
        flops: float = 0.0,
        **extra: object,
    ) -> dict:
        row: dict = {
            "kernel": kernel,
            "variant": variant,
            "shape": shape,
            "ms": ms,
            "bytes": bytes_,
            "flops": flops,
            **extra,
        }
        if bytes_:
            row["tbps"] = bytes_ / ms / 1e9
            row["pct_copy_bw"] = 100 * row["tbps"] / self.ceilings["copy_tbps"]
        if flops:
            row["tflops"] = flops / ms / 1e9
            row["pct_matmul"] = 100 * row["tflops"] / self.ceilings["matmul_tflops"]
        self.timings.append(row)
        print(
            f"time  {kernel:<22} {variant:<28} {shape:<40} {ms * 1e3:9.1f} us"
            + (f"  {row['tbps']:.2f} TB/s ({row['pct_copy_bw']:.0f}%)" if bytes_ else "")
            + (f"  {row['tflops']:.0f} TFLOP/s ({row['pct_matmul']:.0f}%)" if flops else ""),
            flush=True,
        )
        return row


def measure_ceilings(rep: Report) -> None:
    src = torch.randn(256 * 1024 * 1024, device=DEV)  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    rep.ceilings["copy_tbps"] = 2 * src.numel() * 4 / ms / 1e9
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = median_ms(lambda: a @ b)
    rep.ceilings["matmul_tflops"] = 2 * 8192**3 / ms / 1e9
    print(
        f"ceilings: copy {rep.ceilings['copy_tbps']:.2f} TB/s, bf16 matmul {rep.ceilings['matmul_tflops']:.0f} TFLOP/s"
    )


def bench_pointwise(rep: Report) -> None:
    tokens, hidden, inter = 4096, 4096, 14336
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(tokens, hidden, device=DEV).to(dtype)
        res = torch.randn(tokens, hidden, device=DEV).to(dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=DEV)).to(dtype)
        out, res_out = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        rms_norm_triton(x, w, 1e-5, res, out=out, residual_out=res_out)
        ref_out, ref_res = rms_norm_reference(x.float(), w.float(), 1e-5, res.float())
        rep.check(
            "rms_norm+residual",
            dtype,
            f"{tokens}x{hidden}",
            max(rel_err(out, ref_out), rel_err(res_out, ref_res)),
        )
        gu = torch.randn(tokens, 2 * inter, device=DEV).to(dtype)
        act = torch.full((tokens, inter), float("nan"), device=DEV, dtype=dtype)
        silu_and_mul_triton(gu, out=act)
        rep.check(
            "silu_and_mul", dtype, f"{tokens}x{2 * inter}", rel_err(act, silu_and_mul_reference(gu.float()))
        )
        cache = build_cos_sin_cache(rope_inv_freq(D, 500000.0), 8192).to(DEV)
        pos = torch.randint(0, 8192, (tokens,), device=DEV)
        qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, device=DEV).to(dtype)
        q = qkv[:, : HQ * D].view(tokens, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
        qr, kr = q.float().clone(), k.float().clone()
        apply_rotary_reference(qr, kr, pos, cache)
        apply_rotary_triton(q, k, pos, cache)
        rep.check("rotary", dtype, f"T={tokens} q{HQ}/k{HKV}x{D}", max(rel_err(q, qr), rel_err(k, kr)))
        num_blocks = 2 * tokens // BS
        kv = torch.full((2, num_blocks, BS, HKV, D), float("nan"), device=DEV, dtype=dtype)
        slots = torch.randperm(num_blocks * BS, device=DEV)[:tokens]
        key = torch.randn(tokens, HKV, D, device=DEV).to(dtype)
        val = torch.randn(tokens, HKV, D, device=DEV).to(dtype)
        kv_ref = kv.clone()
        reshape_and_cache(key, val, kv, slots)
        reshape_and_cache_reference(key, val, kv_ref, slots)
        same = torch.equal(torch.nan_to_num(kv, nan=7.0), torch.nan_to_num(kv_ref, nan=7.0))
        rep.check("reshape_and_cache", dtype, f"T={tokens} {HKV}x{D}", 0.0 if same else float("inf"))
        if dtype != torch.bfloat16:
            continue
        e = x.element_size()
        shape = f"{tokens}x{hidden}"
        t = median_ms(lambda: rms_norm_triton(x, w, 1e-5, res, out=out, residual_out=res_out))
        b = median_ms(lambda: rms_norm_reference(x, w, 1e-5, res))
        rep.time("rms_norm+residual", "triton", shape, t, 4 * tokens * hidden * e, torch_ms=b, speedup=b / t)
        shape = f"{tokens}x{2 * inter}"
        t = median_ms(lambda: silu_and_mul_triton(gu, out=act))
        b = median_ms(lambda: silu_and_mul_reference(gu))
        rep.time("silu_and_mul", "triton", shape, t, 3 * tokens * inter * e, torch_ms=b, speedup=b / t)
        shape = f"T={tokens} q{HQ}/k{HKV}x{D}"
        t = median_ms(lambda: apply_rotary_triton(q, k, pos, cache))
        b = median_ms(lambda: apply_rotary_reference(q, k, pos, cache))
        rep.time("rotary", "triton", shape, t, 2 * tokens * (HQ + HKV) * D * e, torch_ms=b, speedup=b / t)
        shape = f"T={tokens} {HKV}x{D}"
        t = median_ms(lambda: reshape_and_cache(key, val, kv, slots))
        b = median_ms(lambda: reshape_and_cache_reference(key, val, kv, slots))
        rep.time("reshape_and_cache", "triton", shape, t, 4 * tokens * HKV * D * e, torch_ms=b, speedup=b / t)


def make_tables(
    batch: int, seq_len: int, copies: int, gen: torch.Generator
) -> tuple[int, list[torch.Tensor]]:
    """``copies`` block tables over disjoint shuffled blocks, so timing loops do not re-read L2-resident K/V."""
    per_seq = -(-seq_len // BS)
    total = batch * per_seq * copies
    order = torch.randperm(total, generator=gen)
    tables = [
        order[c * batch * per_seq : (c + 1) * batch * per_seq].view(batch, per_seq).int().to(DEV)
        for c in range(copies)
    ]
    return total, tables


def decode_case(
    batch: int, seq_len: int, gen: torch.Generator
) -> tuple[int, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 decode inputs at Llama-3-8B heads: (K/V bytes read per call, block tables over disjoint blocks
    (>= 400 MB touched per graph replay), cache, query, sequence lengths)."""
    kv_bytes = batch * seq_len * HKV * D * 2 * 2
    copies = max(1, min(64, -(-400_000_000 // kv_bytes)))
    num_blocks, tables = make_tables(batch, seq_len, copies, gen)
    cache = torch.randn(2, num_blocks, BS, HKV, D, device=DEV).to(torch.bfloat16)
    q = torch.randn(batch, HQ, D, device=DEV).to(torch.bfloat16)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device=DEV)
    return kv_bytes, tables, cache, q, lens


def bench_decode(rep: Report, num_sms: int) -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [(1, 2048), (1, 8192), (8, 2048), (32, 1024), (64, 2048), (128, 1024), (256, 512), (256, 2048)]
    # Round 3: defaults re-chosen from round 2 (waves 4, min partition 128); a few neighbours of them.
    variants: dict[str, dict] = {"default": {}, "default_again": {}}
    tune_cases = {(1, 2048), (1, 8192), (8, 2048), (32, 1024)}
    variants["part64"] = {"min_partition": 64}
    variants["part128_bn128"] = {"block_n": 128}
    variants["part64_bn32"] = {"min_partition": 64, "block_n": 32}
    variants["waves8"] = {"waves": 8}
    variants["stages3"] = {"num_stages": 3}
    for batch, seq_len in cases:
        kv_bytes = batch * seq_len * HKV * D * 2 * 2
        copies = max(1, min(64, -(-400_000_000 // kv_bytes)))  # >= 400 MB touched per graph replay
        num_blocks, tables = make_tables(batch, seq_len, copies, gen)
        for dtype in (torch.bfloat16, torch.float16) if (batch, seq_len) == (8, 2048) else (torch.bfloat16,):
            cache = torch.randn(2, num_blocks, BS, HKV, D, device=DEV).to(dtype)
            q = torch.randn(batch, HQ, D, device=DEV).to(dtype)
            lens = torch.full((batch,), seq_len, dtype=torch.int32, device=DEV)
            lens[0] = max(1, seq_len - 7)  # a ragged tail block
            shape = f"B={batch} L={seq_len}"
            out = torch.full_like(q, float("nan"))
            ref = paged_decode_reference(
                q.float(), cache, tables[0], lens, D**-0.5
            )  # upcasts K/V per sequence
            paged_decode(q, cache, tables[0], lens, D**-0.5, num_sms=num_sms, out=out)
            rep.check("paged_decode", dtype, shape, rel_err(out, ref))
            if dtype != torch.bfloat16:
                continue
            plans = variants if (batch, seq_len) in tune_cases else {"default": {}}
            for name, opts in plans.items():
                plan_opts = {
                    k: opts[k] for k in ("block_n", "min_partition", "max_splits", "waves") if k in opts
                }
                plan = plan_decode(batch, HKV, tables[0].shape[1] * BS, num_sms, **plan_opts)
                launch = {k: opts[k] for k in ("num_warps", "num_stages") if k in opts}
                out.fill_(float("nan"))
                paged_decode(q, cache, tables[0], lens, D**-0.5, plan=plan, out=out, **launch)
                err = rel_err(out, ref)
                if err > 1e-2:
                    rep.check(f"paged_decode[{name}]", dtype, shape, err)
                    continue

                def run(plan: DecodePlan = plan, launch: dict = launch) -> None:
                    for t in tables:
                        paged_decode(q, cache, t, lens, D**-0.5, plan=plan, out=out, **launch)

                ms = median_ms(run, graph=True) / len(tables)
                rep.time(
                    "paged_decode",
                    name,
                    shape,
                    ms,
                    kv_bytes,
                    splits=plan.num_splits,
                    partition=plan.partition_size,
                    block_n=plan.block_n,
                    rel_err=err,
                )
            # Baseline: torch SDPA over dense (unpaged) K/V of the same size, GQA via enable_gqa.
            kd = torch.randn(batch, HKV, seq_len, D, device=DEV, dtype=dtype)
            vd = torch.randn(batch, HKV, seq_len, D, device=DEV, dtype=dtype)
            qd = q.view(batch, HQ, 1, D)
            ms = try_median_ms(
                lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True), graph=True
            )
            if ms is not None:
                rep.time("torch_sdpa_dense_decode", "sdpa", shape, ms, kv_bytes)
        torch.cuda.empty_cache()


def read_only_ceiling(rep: Report) -> None:
    buf = torch.randn(2 * 1024**3, device=DEV, dtype=torch.bfloat16)
    ms = median_ms(lambda: buf.sum(dtype=torch.float32))
    rep.time("read_only_sum", "torch", "4 GB bf16", ms, buf.numel() * 2)


def bench_decode_large(rep: Report, num_sms: int) -> None:
    """Launch shapes of the unsplit decode kernel at large batches (workload (d) at 128 and 256 rows, ~544
    cached tokens), against a read-only ceiling: torch.sum over a 4 GB buffer reads without writing."""
    read_only_ceiling(rep)
    gen = torch.Generator().manual_seed(2)
    for batch, seq_len in [(256, 544), (128, 544)]:
        kv_bytes, tables, cache, q, lens = decode_case(batch, seq_len, gen)
        shape = f"B={batch} L={seq_len}"
        out = torch.empty_like(q)
        ref = paged_decode_reference(q.float(), cache, tables[0], lens, D**-0.5)
        width = tables[0].shape[1] * BS
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (1, 2, 3, 4):
                    plan = plan_decode(batch, HKV, width, num_sms, block_n=block_n)
                    launch = {"num_warps": warps, "num_stages": stages}
                    out.fill_(float("nan"))
                    try:
                        paged_decode(q, cache, tables[0], lens, D**-0.5, plan=plan, out=out, **launch)
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: skip that shape
                        print(f"{shape} bn{block_n} w{warps} s{stages}: {exc}".splitlines()[0], flush=True)
                        continue
                    err = rel_err(out, ref)
                    if err > 1e-2:
                        rep.check(f"paged_decode[bn{block_n}_w{warps}_s{stages}]", torch.bfloat16, shape, err)
                        continue

                    def run(plan: DecodePlan = plan, launch: dict = launch) -> None:
                        for t in tables:
                            paged_decode(q, cache, t, lens, D**-0.5, plan=plan, out=out, **launch)

                    ms = median_ms(run, graph=True) / len(tables)
                    rep.time("paged_decode_large", f"bn{block_n}_w{warps}_s{stages}", shape, ms, kv_bytes,
                             splits=plan.num_splits, rel_err=err)
        torch.cuda.empty_cache()


def bench_decode_verify(rep: Report, num_sms: int) -> None:
    """Decode with 1 + k query tokens per sequence (speculative verification rows) against one token: the K/V
    bytes read are the same, so % of copy bandwidth shows what the extra query rows cost. query_len 1 is the
    plain decode kernel (the constexpr one-token variant); compare it with the 'decode' section's default."""
    gen = torch.Generator().manual_seed(3)
    for batch, seq_len in [(1, 2048), (32, 1024), (256, 544)]:
        kv_bytes, tables, cache, q1, lens = decode_case(batch, seq_len, gen)
        width = tables[0].shape[1] * BS
        plan = plan_decode(batch, HKV, width, num_sms)
        for query_len in (1, 2, 4, 8):
            q = torch.randn(batch * query_len, HQ, D, device=DEV).to(torch.bfloat16) if query_len > 1 else q1
            shape = f"B={batch} L={seq_len} q={query_len}"
            out = torch.full_like(q, float("nan"))
            paged_decode(q, cache, tables[0], lens, D**-0.5, plan=plan, out=out, query_len=query_len)
            ref = paged_decode_reference(q.float(), cache, tables[0], lens, D**-0.5, query_len)
            err = rel_err(out, ref)
            rep.check(f"paged_decode[q={query_len}]", torch.bfloat16, shape, err)

            def run(q: torch.Tensor = q, out: torch.Tensor = out, query_len: int = query_len) -> None:
                for t in tables:
                    paged_decode(q, cache, t, lens, D**-0.5, plan=plan, out=out, query_len=query_len)

            ms = median_ms(run, graph=True) / len(tables)
            rep.time("paged_decode_verify", f"q{query_len}", shape, ms, kv_bytes, splits=plan.num_splits,
                     rel_err=err)
        torch.cuda.empty_cache()


def bench_decode_layout(rep: Report, num_sms: int) -> None:
    """Token-major cache blocks ([block, token, head, dim]: one program reads 16 rows of 256 B, 2 KB apart) vs
    head-major ([block, head, token, dim]: one contiguous 4 KB span per block and KV head), the same kernel
    through strides; and key splits at large batches (more, shorter programs: a shorter tail wave)."""
    read_only_ceiling(rep)
    gen = torch.Generator().manual_seed(3)
    for batch, seq_len in [(256, 544), (64, 2048), (8, 2048)]:
        kv_bytes, tables, cache, q, lens = decode_case(batch, seq_len, gen)
        head_major = cache.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)  # same values, new layout
        shape = f"B={batch} L={seq_len}"
        out = torch.empty_like(q)
        ref = paged_decode_reference(q.float(), cache, tables[0], lens, D**-0.5)
        width = tables[0].shape[1] * BS
        base = plan_decode(batch, HKV, width, num_sms)
        plans = {"": base}
        if base.num_splits == 1:
            for splits in (2, 4):
                part = -(-width // splits // base.block_n) * base.block_n
                plans[f"_split{splits}"] = DecodePlan(num_splits=-(-width // part), partition_size=part,
                                                      block_n=base.block_n, min_partition=part)
        for layout, kv in (("token_major", cache), ("head_major", head_major)):
            for suffix, plan in plans.items():
                for launch_name, launch in (("", {}), ("_bn32w2", {"num_warps": 2})):
                    if launch_name and suffix:
                        continue
                    if launch_name:
                        plan = dataclasses.replace(plan, block_n=32, min_partition=min(plan.min_partition, 32))
                    name = f"{layout}{suffix}{launch_name}"
                    out.fill_(float("nan"))
                    paged_decode(q, kv, tables[0], lens, D**-0.5, plan=plan, out=out, **launch)
                    err = rel_err(out, ref)
                    rep.check(f"paged_decode[{name}]", torch.bfloat16, shape, err)

                    def run(plan: DecodePlan = plan, kv: torch.Tensor = kv, launch: dict = launch) -> None:
                        for t in tables:
                            paged_decode(q, kv, t, lens, D**-0.5, plan=plan, out=out, **launch)

                    ms = median_ms(run, graph=True) / len(tables)
                    rep.time("paged_decode_layout", name, shape, ms, kv_bytes, splits=plan.num_splits, rel_err=err)
        del head_major, cache
        torch.cuda.empty_cache()


def bench_decode_wide_table(rep: Report, num_sms: int) -> None:
    """Decode inside a CUDA graph planned for max_model_len: short sequences behind a wide block table.

    "fixed" gives every sequence the planned partition (min_partition == partition_size, the layout before
    per-sequence partitions); "spread" lets each sequence divide its own length over the splits.
    """
    gen = torch.Generator().manual_seed(1)
    for batch, seq_len, table_tokens in [(1, 512, 8192), (8, 512, 8192), (1, 512, 131072), (4, 2048, 131072),
                                         (32, 512, 32768)]:
        kv_bytes, tables, cache, q, lens = decode_case(batch, seq_len, gen)
        width = table_tokens // BS
        tables = [F.pad(t, (0, width - t.shape[1])) for t in tables]
        shape = f"B={batch} L={seq_len} table={table_tokens}"
        out = torch.empty_like(q)
        ref = paged_decode_reference(q.float(), cache, tables[0], lens, D**-0.5)
        spread = plan_decode(batch, HKV, table_tokens, num_sms)
        for name, plan in (("spread", spread),
                           ("fixed", dataclasses.replace(spread, min_partition=spread.partition_size))):
            out.fill_(float("nan"))
            paged_decode(q, cache, tables[0], lens, D**-0.5, plan=plan, out=out)
            rep.check(f"paged_decode[{name}]", torch.bfloat16, shape, rel_err(out, ref))

            def run(plan: DecodePlan = plan) -> None:
                for t in tables:
                    paged_decode(q, cache, t, lens, D**-0.5, plan=plan, out=out)

            ms = median_ms(run, graph=True) / len(tables)
            rep.time("paged_decode_wide_table", name, shape, ms, kv_bytes, splits=plan.num_splits,
                     partition=plan.partition_size, min_partition=plan.min_partition)
        torch.cuda.empty_cache()


def bench_prefill(rep: Report) -> None:
    gen = torch.Generator().manual_seed(1)
    # (list of (context_len, query_len)) -> label
    cases = {
        "4x512 fresh": [(0, 512)] * 4,
        "1x2048 fresh": [(0, 2048)],
        "8x512 over 1536 ctx": [(1536, 512)] * 8,
        "16x512 fresh": [(0, 512)] * 16,
    }
    tune = set(cases)
    variants: dict[str, dict] = {"default": {}, "default_again": {}}
    for bm, bn, warps, stages in ((64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 32, 4, 3)):
        variants[f"m{bm}_n{bn}_w{warps}_s{stages}"] = {
            "block_m": bm,
            "block_n": bn,
            "num_warps": warps,
            "num_stages": stages,
        }
    for label, seqs in cases.items():
        blocks = [-(-(c + q) // BS) for c, q in seqs]
        order = torch.randperm(sum(blocks), generator=gen).tolist()
        tables, at = [], 0
        for n in blocks:
            tables.append(order[at : at + n])
            at += n
        meta = AttentionMetadata.build([q for _, q in seqs], [c + q for c, q in seqs], tables, BS, DEV)
        flops = sum(4 * HQ * D * sum(c + j + 1 for j in range(q)) for c, q in seqs)
        tokens = meta.num_tokens
        for dtype in (torch.bfloat16, torch.float16) if label == "4x512 fresh" else (torch.bfloat16,):
            cache = torch.randn(2, sum(blocks), BS, HKV, D, device=DEV).to(dtype)
            q = torch.randn(tokens, HQ, D, device=DEV).to(dtype)
            out = torch.full_like(q, float("nan"))
            args = (
                q,
                cache,
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_tables,
                meta.max_query_len,
                D**-0.5,
            )
            prefill_attention(*args, out=out)
            ref = prefill_attention_reference(
                q.float(),
                cache.float(),
                meta.query_start_loc_cpu,
                meta.seq_lens_cpu,
                meta.block_tables,
                D**-0.5,
            )
            rep.check("prefill_attention", dtype, label, rel_err(out, ref))
            if dtype != torch.bfloat16:
                continue
            for name, opts in (variants if label in tune else {"default": {}}).items():
                out.fill_(float("nan"))
                prefill_attention(*args, out=out, **opts)
                err = rel_err(out, ref)
                if err > 1e-2:
                    rep.check(f"prefill_attention[{name}]", dtype, label, err)
                    continue
                ms = median_ms(lambda opts=opts: prefill_attention(*args, out=out, **opts))
                rep.time("prefill_attention", name, label, ms, flops=flops, rel_err=err)
            # Baseline: torch SDPA (flash backend) on dense per-sequence tensors, causal, equal-length batch.
            c0, q0 = seqs[0]
            if all(s == seqs[0] for s in seqs):
                qd = torch.randn(len(seqs), HQ, q0, D, device=DEV, dtype=dtype)
                kd = torch.randn(len(seqs), HKV, c0 + q0, D, device=DEV, dtype=dtype)
                vd = torch.randn_like(kd)
                if c0 == 0:
                    fn = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)  # noqa: E731
                else:
                    mask = torch.ones(q0, c0 + q0, dtype=torch.bool, device=DEV).tril(diagonal=c0)
                    fn = lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, enable_gqa=True)  # noqa: E731
                ms = try_median_ms(fn)
                if ms is not None:
                    rep.time("torch_sdpa_dense_prefill", "sdpa", label, ms, flops=flops)
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=os.environ.get("OUT", "benchmarks/results"), help="folder for the JSON"
    )
    parser.add_argument("--only", default="pointwise,decode,decode_wide,prefill", help="comma list of sections")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_kernels.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    rep = Report()
    measure_ceilings(rep)
    sections = set(args.only.split(","))
    errors: dict[str, str] = {}
    for name, run in (
        ("pointwise", lambda: bench_pointwise(rep)),
        ("decode", lambda: bench_decode(rep, props.multi_processor_count)),
        ("decode_wide", lambda: bench_decode_wide_table(rep, props.multi_processor_count)),
        ("decode_large", lambda: bench_decode_large(rep, props.multi_processor_count)),
        ("decode_layout", lambda: bench_decode_layout(rep, props.multi_processor_count)),
        ("decode_verify", lambda: bench_decode_verify(rep, props.multi_processor_count)),
        ("prefill", lambda: bench_prefill(rep)),
    ):
        if name not in sections:
            continue
        try:  # one broken section must not cost the others' device time
            run()
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON and re-raised as the exit status below
            traceback.print_exc()
            errors[name] = repr(exc)
    now = dt.datetime.now(dt.UTC)
    result = {
        "date": now.isoformat(timespec="seconds"),
        "device": f"{props.name}, {props.multi_processor_count} SMs",
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "ceilings": rep.ceilings,
        "checks": rep.checks,
        "timings": rep.timings,
        "errors": errors,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"gpu_kernels_{now:%Y-%m-%d_%H%M}.json"
    path.write_text(json.dumps(result, indent=1))
    failed = [c for c in rep.checks if not c["ok"]]
    print(f"\nwrote {path}; {len(rep.checks)} checks, {len(failed)} failed")
    best: dict[tuple[str, str], dict] = {}
    for row in rep.timings:
        key = (row["kernel"], row["shape"])
        if key not in best or row["ms"] < best[key]["ms"]:
            best[key] = row
    print(
        f"{'kernel':<26}{'shape':<24}{'best variant':<22}{'us':>9}{'TB/s':>7}{'%bw':>6}{'TFLOP/s':>9}{'%mm':>6}"
    )
    for (kernel, shape), row in best.items():
        print(
            f"{kernel:<26}{shape:<24}{row['variant']:<22}{row['ms'] * 1e3:9.1f}"
            f"{row.get('tbps', 0):7.2f}{row.get('pct_copy_bw', 0):6.0f}{row.get('tflops', 0):9.0f}"
            f"{row.get('pct_matmul', 0):6.0f}"
        )
    if failed or errors:
        raise SystemExit(f"{len(failed)} correctness checks failed; section errors: {errors}")


if __name__ == "__main__":
    main()
