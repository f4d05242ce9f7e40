"""What else PyTorch offers a CPU batch-1 decode of SmolLM2's shapes, per call (the options weighed for issue 20's
CPU target): ``_weight_int4pack_mm_for_cpu`` (its inner-K tiles argument is ignored on CPU: tiles 1, 2, 4 and 8
give the same packed bytes in torch 2.13, so there is no tile to choose), ``_weight_int8pack_mm`` (per-row scales only, so it
cannot hold the file's group scales exactly: timed for its speed), dense bf16, and one layer's piece between two
attentions (o_proj, residual + RMSNorm, gate|up, SwiGLU, down, residual + RMSNorm, q|k|v) eager against
``torch.compile`` (inductor C++ for the small ops, PyTorch's int4 kernel kept as an opaque op), with the compile
time and whether the compiled result is bit-identical.

Usage: .venv/bin/python benchmarks/cpu_int4_options.py [--threads N] [--out FILE]
Prints a table and writes JSON (date, machine, load average at start and end, command): median of interleaved
repeats of N calls each, so a change in the shared box's load hits the options alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_record import write_record  # noqa: E402

# (out, in): fused q|k|v, o_proj, fused gate|up, down_proj, and the Q8_0 LM head as int4 of doubled K
SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head_q8": (49152, 1152)}


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def matmul_options(n: int, k: int, gen: torch.Generator) -> dict[str, Callable[[], object]]:
    x = torch.randn(1, k, generator=gen).bfloat16()
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // 32, n, 2, generator=gen) * 0.01).bfloat16()
    weight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    options: dict[str, Callable[[], object]] = {"int4": lambda: torch._weight_int4pack_mm_for_cpu(x, weight, 32, scales)}
    int8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    row_scales = torch.rand(n, generator=gen).bfloat16()
    options["int8 per row"] = lambda: torch._weight_int8pack_mm(x, int8, row_scales)
    dense = torch.randn(n, k, generator=gen).bfloat16()
    options["dense bf16"] = lambda: F.linear(x, dense)
    return options


def rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model/layers.py's CPU RMSNorm with the residual add."""
    x = x + residual
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=1e-5).to(x.dtype), x


@torch.library.custom_op("tokenmill_bench::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, weight: torch.Tensor, group: int, scales: torch.Tensor) -> torch.Tensor:
    """PyTorch's int4 CPU kernel as an opaque op, so inductor calls it instead of lowering it."""
    return torch._weight_int4pack_mm_for_cpu(x, weight, group, scales)


@int4_mm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, group: int, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def layer_piece(mm: Callable, attn: torch.Tensor, residual: torch.Tensor, *weights: torch.Tensor) -> tuple:
    """What a decode step runs between two attentions: o_proj, residual + norm, gate|up, SwiGLU, down, residual +
    norm, q|k|v (the flat stack's order)."""
    o, o_s, post, gate_up, gate_up_s, down, down_s, norm, qkv, qkv_s = weights
    hidden, residual = rms_norm(mm(attn, o, 32, o_s), residual, post)
    mid = mm(hidden, gate_up, 32, gate_up_s)
    half = mid.shape[-1] // 2
    hidden, residual = rms_norm(mm(F.silu(mid[..., :half]) * mid[..., half:], down, 32, down_s), residual, norm)
    return mm(hidden, qkv, 32, qkv_s), residual


def piece_weights(gen: torch.Generator) -> list[torch.Tensor]:
    weights = []
    for name in ("o", "norm", "gate_up", "down", "norm", "qkv"):
        if name == "norm":
            weights.append(torch.randn(576, generator=gen).bfloat16())
            continue
        n, k = SHAPES[name]
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        weights += [torch._convert_weight_to_int4pack_for_cpu(codes, 1),
                    (torch.rand(k // 32, n, 2, generator=gen) * 0.01).bfloat16()]
    return weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(0)
    options = {name: matmul_options(n, k, gen) for name, (n, k) in SHAPES.items()}
    # inductor rounds to bf16 where eager does (emulate_precision_casts), the int4 kernel stays PyTorch's
    torch._inductor.config.emulate_precision_casts = True
    weights = piece_weights(gen)
    attn, residual = (torch.randn(1, 576, generator=gen).bfloat16() for _ in range(2))
    start = time.perf_counter()
    compiled = torch.compile(layer_piece, dynamic=False, fullgraph=True)
    compiled(int4_mm, attn, residual, *weights)
    compile_s = time.perf_counter() - start
    trials = [(torch.randn(1, 576, generator=gen).bfloat16(), torch.randn(1, 576, generator=gen).bfloat16())
              for _ in range(20)]
    identical = all(torch.equal(got, want) for a, r in trials
                    for got, want in zip(compiled(int4_mm, a, r, *weights),
                                         layer_piece(torch._weight_int4pack_mm_for_cpu, a, r, *weights), strict=True))
    options["layer piece"] = {
        "eager": lambda: layer_piece(torch._weight_int4pack_mm_for_cpu, attn, residual, *weights),
        "torch.compile": lambda: compiled(int4_mm, attn, residual, *weights)}
    runs: dict[str, dict[str, list[float]]] = {s: {o: [] for o in opts} for s, opts in options.items()}
    for _ in range(args.repeats):
        for shape, opts in options.items():
            calls = 5 if shape == "lm_head_q8" else 200
            for name, fn in opts.items():
                fn()
                runs[shape][name].append(per_call_us(fn, calls))
    results = {s: {o: statistics.median(r) for o, r in opts.items()} for s, opts in runs.items()}
    for shape, opts in results.items():
        print(f"{shape:16s} " + "  ".join(f"{name} {us:8.1f} us" for name, us in opts.items()))
    print(f"torch.compile of the layer piece: {compile_s:.1f} s to compile, bit-identical on 20 inputs: {identical}")
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu_int4_options_{dt.date.today().isoformat()}.json")
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
               "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": os.getloadavg()[0]}
    write_record(out, "cpu_int4_options", machine=machine, shapes=SHAPES, median_us_per_call=results,
                 runs_us=runs, layer_piece_compile_s=compile_s, layer_piece_compiled_bit_identical=identical)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
