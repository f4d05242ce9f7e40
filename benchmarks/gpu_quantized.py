"""W4A16 / W8A16 linears (kernels/wna16_gemm.py) against bf16 cuBLAS on Llama-3-8B's decode projections.

Correctness first: every config is checked against the fp32 dequantized reference on fresh random inputs
(the run stops on a mismatch). Then, per projection (qkv 6144x4096, o 4096x4096, gate_up 28672x4096,
down 4096x14336) and batch size, one CUDA graph runs the projection for all 32 layers (32 distinct weights,
so nothing is served from L2) and its replays are timed with CUDA events (median). Each W4A16 config of a small
sweep is timed; the best is reported beside the default heuristic's pick and cuBLAS bf16. Times are compared
with each format's bandwidth floor: (weights + scales + activations) / the copy rate measured in the same run.
The 'decode linears' rows add up the four projections x 32 layers: the issue's targets are W4A16 >= 2.5x bf16
at batch 1, >= 1.5x at 64 and no slower at 256 (reported, not asserted). Random codes: speed does not depend
on the values.

    python3 benchmarks/gpu_quantized.py --e2e off --out $OUT/gpu_quantized_kernels.json   # H100, ~5-7 min
    python3 benchmarks/gpu_quantized.py --e2e only --out $OUT/gpu_quantized_e2e.json      # H100, ~3-5 min

For rows <= 8 the sweep also times the GEMV kernel (``WNA16Config(gemv=True)``); ``w4_best_by_kernel`` says
which kernel won per shape and row count. ``--e2e`` adds offline decode of the llama3-8b random-weights preset
in bf16 and quantized at load (``--quantization rtn4`` / ``int8``): decode step time per batch, weight GiB,
KV cache tokens (the freed memory shows up there) and % of the batch-1 bandwidth floor. A method may name the
4-bit weights' layout (``--e2e-methods bf16,rtn4:gptq,rtn4:kmajor``: --quant-weight-layout), so one call A/Bs
the GPTQ layout's kernels against the K-major ones; ``--dry-run`` runs that part on CPU with a tiny preset.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_decode_linears import copy_rate_gbps
from gpu_pdl_probe import time_graph
from gpu_record import write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.kernels.wna16_gemm import (  # noqa: E402
    GEMV_MAX_ROWS,
    PackedWeight,
    WNA16Config,
    default_config,
    wna16_linear,
    wna16_linear_reference,
)

LAYERS = 32
try:  # Triton's error for a config whose tiles do not fit the SM's shared memory / registers
    from triton.runtime.errors import OutOfResources as OUT_OF_RESOURCES
except ImportError:
    OUT_OF_RESOURCES = RuntimeError
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
BATCHES = (1, 4, 8, 16, 64, 128, 256)
GROUP = 128


def sweep(rows: int) -> list[WNA16Config]:
    """MMA tiles for every row count, plus the GEMV kernel's tiles where it applies (rows <= 8)."""
    if rows <= 16:
        grid = itertools.product([16], [32, 64, 128], [64, 128], [1, 2, 4, 8])
    else:
        grid = itertools.product([32, 64, 128], [64, 128], [32, 64], [1, 2])
    configs = [WNA16Config(m, n, k, s, 8 if m == 128 else 4, 3) for m, n, k, s in grid]
    if rows <= GEMV_MAX_ROWS:
        configs += [WNA16Config(16, n, k, s, w, 3, gemv=True)
                    for n, k, s, w in itertools.product([64, 128], [128, 256], [1, 2, 4, 8], [4])]
    return configs


def random_packed(n: int, k: int, bits: int, zeros: bool, gen: torch.Generator) -> PackedWeight:
    per_word = 32 // bits
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // per_word, n), device="cuda", dtype=torch.int32, generator=gen)
    scales = (torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.01 + 0.002).to(torch.bfloat16)
    zero = None
    if zeros:
        zero = torch.randint(0, 2**bits, (k // GROUP, n), device="cuda", generator=gen).to(torch.bfloat16)
    return PackedWeight(qweight, scales, zero, bits, GROUP)


def packed_bytes(p: PackedWeight) -> int:
    return p.qweight.numel() * 4 + p.scales.numel() * 2 + (0 if p.zeros is None else p.zeros.numel() * 2)


def graph_ms(fn, repeats: int = 20) -> float:
    """Median ms of one replay of a CUDA graph captured around ``fn``."""
    return time_graph(fn, repeats) / 1e3


def check_correctness(gen: torch.Generator) -> list[dict[str, Any]]:
    """Every swept config (and the default) on every shape, at 1, 16 and 64 rows, 4-bit sym, 4-bit zeros, 8-bit."""
    checks = []
    for (name, (n, k)), bits, zeros in itertools.product(SHAPES.items(), (4, 8), (False, True)):
        if bits == 8 and zeros:
            continue
        packed = random_packed(n, k, bits, zeros, gen)
        for rows in (1, 16, 64):
            x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
            ref = wna16_linear_reference(x.float(), packed).float()
            configs = [None] + (sweep(rows) if bits == 4 and not zeros else [])
            worst = 0.0
            for config in configs:
                try:
                    out = wna16_linear(x, packed, None, config).float()
                except OUT_OF_RESOURCES as exc:  # a tile too large for shared memory: not a candidate
                    print(f"skip {config.name}: {type(exc).__name__}", flush=True)
                    continue
                err = ((out - ref).norm() / ref.norm()).item()
                worst = max(worst, err)
                if not err < 2e-2:
                    raise SystemExit(f"MISMATCH {name} rows={rows} bits={bits} zeros={zeros} {config}: rel err {err}")
            checks.append({"shape": name, "rows": rows, "bits": bits, "zeros": zeros, "configs": len(configs),
                           "max_rel_err": worst})
        del packed
    return checks


def bench_shape(name: str, n: int, k: int, batches: tuple[int, ...], rate: float, gen: torch.Generator,
                full_sweep: bool) -> list[dict[str, Any]]:
    dense = [torch.randn(n, k, device="cuda", generator=gen).to(torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    packed = [random_packed(n, k, 4, False, gen) for _ in range(LAYERS)]
    packed8 = [random_packed(n, k, 8, False, gen) for _ in range(LAYERS)]
    rows_out = []
    for rows in batches:
        x = torch.randn(rows, k, device="cuda", generator=gen).to(torch.bfloat16)
        act_bytes = LAYERS * (rows * k + rows * n) * 2
        bf16_ms = graph_ms(lambda x=x: [F.linear(x, w) for w in dense])
        default = default_config(rows, n, k, GROUP)
        w4_default_ms = graph_ms(lambda x=x, c=default: [wna16_linear(x, p, None, c) for p in packed])
        best_ms, best_cfg = w4_default_ms, default
        best_by_kernel: dict[str, tuple[float, str]] = {}
        for config in sweep(rows) if full_sweep else []:
            try:
                ms = graph_ms(lambda x=x, c=config: [wna16_linear(x, p, None, c) for p in packed], repeats=10)
            except OUT_OF_RESOURCES:
                continue
            kernel = "gemv" if config.gemv else "mma"
            if ms < best_by_kernel.get(kernel, (float("inf"), ""))[0]:
                best_by_kernel[kernel] = (ms, config.name)
            if ms < best_ms:
                best_ms, best_cfg = ms, config
        w8_ms = graph_ms(lambda x=x: [wna16_linear(x, p, None) for p in packed8])
        floor = {
            "bf16": (LAYERS * n * k * 2 + act_bytes) / rate / 1e6,
            "w4": (sum(packed_bytes(p) for p in packed) + act_bytes) / rate / 1e6,
            "w8": (sum(packed_bytes(p) for p in packed8) + act_bytes) / rate / 1e6,
        }
        row = {
            "shape": name, "n": n, "k": k, "rows": rows,
            "bf16_ms": bf16_ms, "w4_default_ms": w4_default_ms, "w4_default_config": default.name,
            "w4_best_ms": best_ms, "w4_best_config": best_cfg.name, "w8_default_ms": w8_ms,
            "w4_speedup_vs_bf16": bf16_ms / best_ms, "w8_speedup_vs_bf16": bf16_ms / w8_ms,
            "bf16_pct_of_floor": 100 * floor["bf16"] / bf16_ms, "w4_pct_of_floor": 100 * floor["w4"] / best_ms,
            "w8_pct_of_floor": 100 * floor["w8"] / w8_ms,
            "w4_best_by_kernel": {k: {"ms": ms, "config": name} for k, (ms, name) in best_by_kernel.items()},
        }
        rows_out.append(row)
        print(f"{name:8s} rows={rows:4d}  bf16 {bf16_ms:7.3f} ms ({row['bf16_pct_of_floor']:5.1f}% floor)  "
              f"w4 {best_ms:7.3f} ms ({row['w4_pct_of_floor']:5.1f}%, {best_cfg.name}; default "
              f"{w4_default_ms:7.3f})  w8 {w8_ms:7.3f} ms  w4 speedup {row['w4_speedup_vs_bf16']:.2f}x"
              + "".join(f"  best {k} {ms:.3f}" for k, (ms, _) in sorted(best_by_kernel.items())), flush=True)
    return rows_out  # the weights are freed with this frame


DECODER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _param_bytes(modules: list[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


# --quantize-lm-head; pass_config fuse_gemm_act off (the SiLU-and-mul kernel), fuse_gemm_norm on (no norm kernels)
E2E_SUFFIXES = ("lmhead", "noact", "norm")


def parse_methods(spec: str) -> list[tuple[str, str | None, str, bool, dict[str, bool]]]:
    """``bf16,rtn4:gptq,rtn4:kmajor+lmhead+noact`` -> [(label, --quantization or None, --quant-weight-layout,
    --quantize-lm-head, pass_config)]."""
    out = []
    for item in spec.split(","):
        base, *suffixes = item.split("+")
        unknown = [s for s in suffixes if s not in E2E_SUFFIXES]
        if unknown:
            raise SystemExit(f"--e2e-methods {item!r}: + suffixes are {', '.join(E2E_SUFFIXES)}; got {unknown}")
        method, _, layout = base.partition(":")
        passes = {"fuse_gemm_act": "noact" not in suffixes, "fuse_gemm_norm": "norm" in suffixes}
        out.append((item, None if method == "bf16" else method, layout or "auto", "lmhead" in suffixes, passes))
    return out


def end_to_end(batches: tuple[int, ...], rate: float | None, input_len: int, output_len: int,
               preset: str = "llama3-8b", device: str = "cuda",
               methods: tuple[str, ...] = ("bf16", "rtn4", "int8"), max_model_len: int | None = None,
               dry_run: bool = False) -> list[dict[str, Any]]:
    """Offline decode of a random-weights preset: bf16, then quantized at load (``rtn4``, ``int8``, ``fp8``; a
    ``:gptq`` / ``:kmajor`` suffix picks --quant-weight-layout), one engine at a time. Per batch: median
    decode-only step time and tokens/s, prompt-step tokens/s (prefill); per engine: start-up seconds, weight bytes (all, and the decoder linears'), linears per served layout,
    KV blocks and tokens (``max_model_len`` large enough that memory, not the per-sequence cap, sets them), and the
    batch-1 floor (bytes every decode step reads: all weights but the embedding table, at the copy rate; KV ignored
    at these lengths). ``dry_run`` (CPU): the layout is left to ``auto`` where CPU cannot serve the one asked for."""
    import gc

    from tokenmill.bench.throughput import run_offline
    from tokenmill.bench.workloads import fixed_workload
    from tokenmill.engine.llm_engine import LLMEngine

    rows = []
    for label, quantization, layout, lm_head, passes in parse_methods(",".join(methods)):
        served_layout = "auto" if dry_run and layout == "kmajor" else layout
        start = time.perf_counter()
        engine = LLMEngine.from_kwargs(
            random_weights=preset, dtype="bfloat16", device=device,
            max_model_len=max_model_len or input_len + output_len + 16, max_num_seqs=max(batches),
            quantization=quantization, quant_weight_layout=served_layout, quantize_lm_head=lm_head,
            compilation_config={"pass_config": passes}, stream_outputs=False)
        start_s = time.perf_counter() - start
        model = engine.model
        weight_bytes = _param_bytes([model])
        linears = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in DECODER_LINEARS]
        layouts: dict[str, int] = {}
        for m in linears:
            choice = getattr(m, "wna16_layout", None)
            key = choice.layout if choice is not None else type(m.linear_method).__name__
            layouts[key] = layouts.get(key, 0) + 1
        embed_bytes = _param_bytes([model.model.embed_tokens])
        floor_ms = None if rate is None else (weight_bytes - embed_bytes) / rate / 1e6
        vocab = model.spec.vocab_size
        for batch in batches:
            run_offline(engine, fixed_workload(batch, input_len, 4, vocab, seed=7), temperature=0.0,
                        id_prefix=f"warm-{label}-{batch}-")
            result = run_offline(engine, fixed_workload(batch, input_len, output_len, vocab, seed=batch),
                                 temperature=0.0, id_prefix=f"{label}-{batch}-")
            timed = list(zip(result.steps, result.step_times_s, strict=True))
            decode = sorted(t for shape, t in timed if shape.is_decode)
            step_ms = 1e3 * decode[len(decode) // 2]
            prefill_s = sum(t for shape, t in timed if not shape.is_decode)
            prefill_tokens = sum(shape.num_tokens for shape, _ in timed if not shape.is_decode)
            row = {"method": label, "quantization": quantization, "layout": layout, "served_layouts": layouts,
                   "quantize_lm_head": lm_head, **passes,
                   "batch": batch, "decode_step_ms": step_ms, "decode_tok_s": batch / step_ms * 1e3,
                   "prefill_tok_s": prefill_tokens / prefill_s if prefill_s else None,
                   "output_tok_s": result.output_tok_s, "weight_gib": weight_bytes / 2**30,
                   "linear_weight_gib": _param_bytes(linears) / 2**30, "engine_start_s": start_s,
                   "kv_cache_blocks": engine.num_kv_cache_tokens // engine.config.cache.block_size,
                   "kv_cache_tokens": engine.num_kv_cache_tokens, "floor_ms": floor_ms,
                   "pct_of_floor": None if floor_ms is None else 100 * floor_ms / step_ms,
                   "jit_compiles_in_timed_run": len(result.jit_compiles)}
            rows.append(row)
            floor = "" if floor_ms is None else f", {row['pct_of_floor']:5.1f}% of the {floor_ms:.3f} ms floor"
            print(f"e2e {label:12s} batch {batch:4d}: decode step {step_ms:7.3f} ms ({row['decode_tok_s']:8.1f} "
                  f"tok/s{floor}), prefill {row['prefill_tok_s'] or 0:9.0f} tok/s  weights {row['weight_gib']:.2f} "
                  f"GiB (linears {row['linear_weight_gib']:.2f}), KV {engine.num_kv_cache_tokens} tokens, "
                  f"layouts {layouts}, start {start_s:.0f} s", flush=True)
        engine.shutdown()
        del engine, model, linears
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for batch in batches:
        by = {r["method"]: r for r in rows if r["batch"] == batch}
        if "bf16" not in by:
            continue
        base = by["bf16"]
        for label, row in by.items():
            if label != "bf16":
                row["speedup_vs_bf16"] = base["decode_step_ms"] / row["decode_step_ms"]
                if row["prefill_tok_s"] and base["prefill_tok_s"]:
                    row["prefill_vs_bf16"] = row["prefill_tok_s"] / base["prefill_tok_s"]
                row["weight_memory_x_smaller"] = base["weight_gib"] / row["weight_gib"]
                row["linear_weight_memory_x_smaller"] = base["linear_weight_gib"] / row["linear_weight_gib"]
                row["kv_tokens_vs_bf16"] = row["kv_cache_tokens"] / base["kv_cache_tokens"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_quantized.json"))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--no-sweep", action="store_true", help="time only the default config")
    parser.add_argument("--e2e", choices=("off", "also", "only"), default="also",
                        help="offline decode of the llama3-8b preset bf16 vs rtn4 vs int8 (after the kernels, "
                             "instead of them, or not)")
    parser.add_argument("--e2e-batches", default="1,16,64,256")
    parser.add_argument("--e2e-methods", default="bf16,rtn4,int8",
                        help="bf16 and --quantization methods (e.g. fp8), each optionally :gptq or :kmajor "
                             "(--quant-weight-layout), +lmhead (--quantize-lm-head), +noact (pass_config fuse_gemm_act "
                             "off) and +norm (fuse_gemm_norm on), e.g. "
                             "bf16,rtn4:gptq,rtn4:kmajor,fp8+lmhead+noact")
    parser.add_argument("--e2e-lens", default="128,64", help="input,output tokens per request")
    parser.add_argument("--e2e-max-model-len", type=int, default=None,
                        help="engine max_model_len (default input + output + 16; larger lets GPU memory, not the "
                             "per-sequence cap, size the KV cache, so freed weight memory shows up as KV blocks)")
    parser.add_argument("--dry-run", action="store_true",
                        help="--e2e only on CPU with the tiny-llama preset (checks the script end to end; a "
                             "kmajor layout is served as auto there: its kernels are CUDA-only)")
    args = parser.parse_args()
    if args.dry_run:
        if args.e2e != "only":
            raise SystemExit("--dry-run runs the --e2e only part")
        input_len, output_len = (int(v) for v in args.e2e_lens.split(","))
        e2e = end_to_end(tuple(int(b) for b in args.e2e_batches.split(",")), None, input_len, output_len,
                         preset="tiny-llama", device="cpu", methods=tuple(args.e2e_methods.split(",")),
                         max_model_len=args.e2e_max_model_len, dry_run=True)
        print(f"wrote {write_record(args.out, 'gpu_quantized', dry_run=True, end_to_end=e2e)}")
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    batches = tuple(int(b) for b in args.batches.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.e2e == "only":
        start = time.perf_counter()
        rate = copy_rate_gbps()
        input_len, output_len = (int(v) for v in args.e2e_lens.split(","))
        e2e = end_to_end(tuple(int(b) for b in args.e2e_batches.split(",")), rate, input_len, output_len,
                         methods=tuple(args.e2e_methods.split(",")), max_model_len=args.e2e_max_model_len)
        path = write_record(args.out, "gpu_quantized", copy_rate_gbps=rate, end_to_end=e2e,
                            wall_s=time.perf_counter() - start)
        print(f"wrote {path}")
        return
    checks = check_correctness(gen)
    print(f"correctness: {len(checks)} shape/rows/format cases, max rel err "
          f"{max(c['max_rel_err'] for c in checks):.2e}", flush=True)
    rate = copy_rate_gbps()
    print(f"copy rate {rate:.0f} GB/s (read + write)", flush=True)
    results = []
    for name, (n, k) in SHAPES.items():
        results += bench_shape(name, n, k, batches, rate, gen, not args.no_sweep)
        torch.cuda.empty_cache()
    totals = []
    for rows in batches:
        mine = [r for r in results if r["rows"] == rows]
        bf16 = sum(r["bf16_ms"] for r in mine)
        w4 = sum(r["w4_best_ms"] for r in mine)
        w4_default = sum(r["w4_default_ms"] for r in mine)
        w8 = sum(r["w8_default_ms"] for r in mine)
        totals.append({"rows": rows, "bf16_ms": bf16, "w4_best_ms": w4, "w4_default_ms": w4_default, "w8_ms": w8,
                       "w4_speedup": bf16 / w4, "w4_default_speedup": bf16 / w4_default, "w8_speedup": bf16 / w8})
    print("\ndecode linears (4 projections x 32 layers, no lm_head):")
    print(f"{'rows':>5} {'bf16 ms':>9} {'w4 ms':>9} {'w4 x':>6} {'w4 dflt x':>9} {'w8 ms':>9} {'w8 x':>6}")
    for t in totals:
        print(f"{t['rows']:5d} {t['bf16_ms']:9.3f} {t['w4_best_ms']:9.3f} {t['w4_speedup']:6.2f} "
              f"{t['w4_default_speedup']:9.2f} {t['w8_ms']:9.3f} {t['w8_speedup']:6.2f}")
    e2e = []
    if args.e2e == "also":
        input_len, output_len = (int(v) for v in args.e2e_lens.split(","))
        e2e = end_to_end(tuple(int(b) for b in args.e2e_batches.split(",")), rate, input_len, output_len,
                         methods=tuple(args.e2e_methods.split(",")), max_model_len=args.e2e_max_model_len)
    path = write_record(args.out, "gpu_quantized", copy_rate_gbps=rate, group_size=GROUP, layers=LAYERS,
                        correctness=checks, projections=results, decode_linears=totals, end_to_end=e2e)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
