"""FP8 on Hopper (issue 22): FP8 KV decode attention, FP8 W8A8 GEMMs and the engine with FP8, against bf16.

One run, ceilings measured in the same run (copy GB/s, bf16 and FP8 8192^3 matmul TFLOP/s):
1. kv_decode: paged decode attention at Llama-3-8B heads (32 q / 8 KV heads, dim 128, block 16) over a bf16
   cache vs an e4m3 cache of the same values (per-tensor scales), per (batch, context): correctness (FP8 kernel
   vs the fp32 reference over the same FP8 cache, and vs the bf16 result), the time of one layer's call
   (CUDA graph over enough distinct layer caches to defeat L2), and the share of the copy rate for its bytes.
2. gemm: Llama-3-8B projections (qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336) at row counts
   1..8192: bf16 F.linear vs FP8 ``fp8_linear`` (fused per-token quantize + row-wise ``torch._scaled_mm``) and
   ``_scaled_mm`` alone, checked against the fp64 product of the FP8 operands.
3. engine: ``--random-weights llama3-8b`` offline throughput (``tokenmill bench throughput``'s machinery) as
   bf16, FP8 KV, FP8 weights, FP8 weights + FP8 KV: (a) 128 x 512 -> 128, max load 128 -> 128 (N requests at
   once) and batch-1 128 -> 256, with the KV token capacity of each and the % of the physical floor.

    python3 benchmarks/gpu_fp8.py --out $OUT/gpu_fp8.json           # H100, ~6-8 min
    python3 benchmarks/gpu_fp8.py --quick --device cpu --preset tiny-llama --out /tmp/fp8.json   # plumbing only
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_decode_linears import copy_rate_gbps  # noqa: E402
from gpu_pdl_probe import time_graph  # noqa: E402
from gpu_record import write_record  # noqa: E402

from tokenmill.bench.roofline import Ceilings, summarize  # noqa: E402
from tokenmill.bench.throughput import run_offline, warm_up_mixed_steps  # noqa: E402
from tokenmill.bench.workloads import fixed_workload  # noqa: E402
from tokenmill.cuda_timing import median_event_ms  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.kernels.fp8_quant import FP8_E4M3, quantize_fp8  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DECODE_CASES = [(1, 4096), (1, 32768), (16, 4096), (64, 4096), (256, 2048), (32, 16384)]
GEMM_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
GEMM_ROWS = (1, 16, 64, 256, 1024, 4096, 8192)
VARIANTS = {  # name -> engine kwargs on top of the common ones; run in this order (the main pair first)
    "bf16": {},
    "fp8_w_kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
    "fp8_kv": {"kv_cache_dtype": "fp8"},
    "fp8_w": {"quantization": "fp8"},
    "fp8_w_kv_lmhead": {"quantization": "fp8", "kv_cache_dtype": "fp8", "quantize_lm_head": True},  # opt-in head
}
L2_DEFEAT_BYTES = 256 * 2**20  # data touched per graph replay: several times the H100's 50 MB L2


def graph_ms(fn: Any, repeats: int = 20) -> float:
    """Median ms of one replay of a CUDA graph captured around ``fn`` (launch overhead out of the figure)."""
    return time_graph(fn, repeats) / 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- ceilings ------------------------------------------------------------------------------------------
def ceilings() -> dict[str, float]:
    copy = copy_rate_gbps()
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    b = torch.randn(n, n, device="cuda").to(torch.bfloat16)
    bf16 = 2 * n**3 / median_event_ms(lambda: a @ b, 20) / 1e9
    a8, b8 = a.to(FP8_E4M3), b.to(FP8_E4M3)
    one = torch.ones((), device="cuda")
    fp8 = 2 * n**3 / median_event_ms(
        lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 20) / 1e9
    return {"copy_gbps": copy, "bf16_matmul_tflops": bf16, "fp8_matmul_tflops": fp8}


# ---- 1. FP8 KV decode attention -------------------------------------------------------------------------
def kv_decode(copy_gbps: float) -> list[dict[str, Any]]:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for batch, context in DECODE_CASES:
        rows.append(decode_case(batch, context, sms, copy_gbps))
        free()
    return rows


def decode_case(batch: int, context: int, sms: int, copy_gbps: float) -> dict[str, Any]:
    from tokenmill.attention.kv_cache import LayerKVCache
    from tokenmill.config import KVCacheSpec
    from tokenmill.kernels.paged_attention import paged_decode, paged_decode_reference, plan_decode

    blocks_per_seq = math.ceil(context / BLOCK)
    num_blocks = batch * blocks_per_seq
    layer_bytes_bf16 = 2 * num_blocks * BLOCK * KV_HEADS * HEAD_DIM * 2
    layers = max(1, min(16, math.ceil(L2_DEFEAT_BYTES / (layer_bytes_bf16 / 2))))
    gen = torch.Generator(device="cuda").manual_seed(batch * 7 + context)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    table = perm.view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", generator=gen).to(torch.bfloat16)
    k_scale = torch.tensor(0.02, device="cuda")
    v_scale = torch.tensor(0.02, device="cuda")
    bf16_caches, fp8_caches = [], []
    for _ in range(layers):
        kv = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=gen)
        bf16_caches.append(LayerKVCache(kv.to(torch.bfloat16)))
        spec = KVCacheSpec(BLOCK, KV_HEADS, HEAD_DIM, FP8_E4M3, "tensor")
        fp8_caches.append(LayerKVCache((kv / 0.02).clamp(-448, 448).to(FP8_E4M3), spec))
        del kv
    plan = plan_decode(batch, KV_HEADS, blocks_per_seq * BLOCK, sms)
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(query)
    # Correctness on layer 0 (a prefix of the batch for the fp32 reference's sake).
    check = min(batch, 4)
    fp8_out = paged_decode(query, fp8_caches[0], table, seq_lens, scale, plan=plan, k_scale=k_scale,
                           v_scale=v_scale)
    ref = paged_decode_reference(query[:check].float(), fp8_caches[0], table[:check], seq_lens[:check], scale,
                                 1, k_scale, v_scale)
    bf16_out = paged_decode(query, bf16_caches[0], table, seq_lens, scale, plan=plan)
    err_kernel = rel_err(fp8_out[:check], ref)
    err_vs_bf16 = rel_err(fp8_out, bf16_out)
    if not err_kernel < 1e-2:
        raise SystemExit(f"MISMATCH FP8 decode batch={batch} context={context}: rel err {err_kernel}")

    def run(caches: list, scaled: bool) -> None:
        for c in caches:
            paged_decode(query, c, table, seq_lens, scale, plan=plan, out=out,
                         k_scale=k_scale if scaled else None, v_scale=v_scale if scaled else None)

    bf16_ms = graph_ms(lambda: run(bf16_caches, False)) / layers
    fp8_ms = graph_ms(lambda: run(fp8_caches, True)) / layers
    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2  # K and V, one byte each in FP8
    row = {
        "batch": batch, "context": context, "layers_per_graph": layers, "splits": plan.num_splits,
        "bf16_us": 1e3 * bf16_ms, "fp8_us": 1e3 * fp8_ms, "speedup": bf16_ms / fp8_ms,
        "bf16_pct_of_copy": 100 * (2 * kv_bytes / 1e9) / (bf16_ms / 1e3) / copy_gbps,
        "fp8_pct_of_copy": 100 * (kv_bytes / 1e9) / (fp8_ms / 1e3) / copy_gbps,
        "rel_err_fp8_kernel_vs_fp32_ref": err_kernel, "rel_err_fp8_vs_bf16_cache": err_vs_bf16,
    }
    print(f"[kv_decode] B={batch:>3} L={context:>5}: bf16 {1e3 * bf16_ms:7.1f} us  fp8 {1e3 * fp8_ms:7.1f} us "
          f"({bf16_ms / fp8_ms:.2f}x, {row['fp8_pct_of_copy']:.0f}% of copy)", flush=True)
    return row


# ---- 2. FP8 W8A8 GEMMs --------------------------------------------------------------------------------
def gemm() -> list[dict[str, Any]]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in GEMM_SHAPES.items():
        rows.extend(gemm_shape(name, n, k, gen))
        free()
    return rows


def gemm_shape(name: str, n: int, k: int, gen: torch.Generator) -> list[dict[str, Any]]:
    from tokenmill.kernels.fp8_quant import quantize_fp8_per_token
    from tokenmill.quantization.fp8 import fp8_linear

    rows = []
    copies = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / (n * k))))  # distinct weights per graph
    dense = [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16) for _ in range(copies)]
    quantized = [quantize_fp8(w, dim=1) for w in dense]
    weights = [(q, s.view(-1)) for q, s in quantized]
    del quantized
    for m in GEMM_ROWS:
        x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
        out = fp8_linear(x, *weights[0], None)
        xq, xs = quantize_fp8(x, dim=-1)
        want = (xq.double() * xs.double()) @ (weights[0][0].double() * weights[0][1].double()[:, None]).t()
        err = rel_err(out, want)
        if not err < 1e-2:
            raise SystemExit(f"MISMATCH fp8_linear {name} m={m}: rel err {err}")
        xq, xs = quantize_fp8_per_token(x)
        reps = 10 if m >= 1024 else 20
        bf16_ms = graph_ms(lambda x=x: [F.linear(x, w) for w in dense], reps) / copies
        fp8_ms = graph_ms(lambda x=x: [fp8_linear(x, q, s, None) for q, s in weights], reps) / copies
        mm_ms = graph_ms(lambda xq=xq, xs=xs: [torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.view(1, -1),
                                                                 out_dtype=torch.bfloat16)
                                                for q, s in weights], reps) / copies
        flops = 2 * m * n * k
        rows.append({"shape": name, "n": n, "k": k, "rows": m, "bf16_us": 1e3 * bf16_ms, "fp8_us": 1e3 * fp8_ms,
                     "scaled_mm_only_us": 1e3 * mm_ms, "speedup": bf16_ms / fp8_ms,
                     "bf16_tflops": flops / bf16_ms / 1e9, "fp8_tflops": flops / fp8_ms / 1e9,
                     "rel_err_vs_fp64": err})
        print(f"[gemm] {name:>7} m={m:>5}: bf16 {1e3 * bf16_ms:8.1f} us  fp8 {1e3 * fp8_ms:8.1f} us "
              f"(mm {1e3 * mm_ms:8.1f}; {bf16_ms / fp8_ms:.2f}x)", flush=True)
    return rows


# ---- 3. engine -----------------------------------------------------------------------------------------
def engine_runs(args: argparse.Namespace, ceils: dict[str, float], deadline: float) -> list[dict[str, Any]]:
    quick = args.quick
    a = (8, 32, 8) if quick else (128, 512, 128)
    max_load = (32, 16, 16) if quick else (args.max_load_requests, 128, 128)
    batch1 = (1, 16, 16) if quick else (1, 128, 256)
    rows = []
    for variant in args.variants.split(","):
        if time.perf_counter() > deadline:
            rows.append({"variant": variant, "skipped": "time budget spent"})
            continue
        free()
        # Memory a previous variant left allocated would shrink this one's KV cache: recorded to check.
        left_over = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine = LLMEngine.from_kwargs(
            random_weights=args.preset, dtype="bfloat16" if args.device.startswith("cuda") else "float32",
            # 4096: the useful-block cap (max_num_seqs x max_model_len) stays above what the memory holds, so
            # the KV token capacity shows each variant's bytes per token.
            device=args.device, max_model_len=64 if quick else args.max_model_len,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            stream_outputs=False, **VARIANTS[variant])
        build_s = time.perf_counter() - t0
        spec = engine.model.spec
        print(f"[engine] {variant}: ready in {build_s:.1f} s, KV cache {engine.num_kv_cache_tokens:,} tokens",
              flush=True)
        warm_up_mixed_steps(engine, spec.vocab_size, 16 if quick else 256, 4 if quick else 8, temperature=0.0)
        fp8_weights = "quantization" in VARIANTS[variant]
        fp8_kv = "kv_cache_dtype" in VARIANTS[variant]
        matmul = ceils.get("fp8_matmul_tflops" if fp8_weights else "bf16_matmul_tflops", 800.0)
        cl = Ceilings(ceils.get("copy_gbps", 3000.0), matmul)
        row: dict[str, Any] = {"variant": variant, "build_s": build_s, "kv_cache_tokens": engine.num_kv_cache_tokens,
                               "allocated_before_build_bytes": left_over, "workloads": {}}
        for key, (num, inp, out) in (("a_128x512to128", a), ("max_load_128to128", max_load),
                                     ("batch1_128to256", batch1)):
            requests = fixed_workload(num, inp, out, spec.vocab_size, seed=num + inp)
            result = run_offline(engine, requests, ignore_eos=True, temperature=0.0, id_prefix=f"{key}-")
            # The floor at the variant's bytes: 1 per weight and KV element when both are FP8, else bf16's 2
            # (a mixed variant's floor is then an upper bound on its time, its % a lower bound).
            roof = summarize(spec, result.steps, result.step_times_s, cl, 1 if fp8_weights and fp8_kv else 2)
            row["workloads"][key] = {
                "requests": num, "input_len": inp, "output_len": out, "output_tok_s": result.output_tok_s,
                "elapsed_s": result.elapsed_s, "floor_bytes_per_element": 1 if fp8_weights and fp8_kv else 2,
                "roofline": roof.to_dict(), "jit_compiles": len(result.jit_compiles),
            }
            print(f"[engine] {variant} {key}: {result.output_tok_s:,.1f} output tok/s "
                  f"({roof.floor_pct:.1f}% of floor)", flush=True)
        rows.append(row)
        del engine
        free()
    base = next((r for r in rows if r.get("variant") == "bf16" and "workloads" in r), None)
    for r in rows:
        if base is not None and "workloads" in r:
            r["speedup_vs_bf16"] = {k: v["output_tok_s"] / base["workloads"][k]["output_tok_s"]
                                    for k, v in r["workloads"].items()}
            r["kv_tokens_vs_bf16"] = r["kv_cache_tokens"] / base["kv_cache_tokens"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="kv_decode,gemm,engine")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-load-requests", type=int, default=1024)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="start no engine variant after this many seconds (each takes ~1-1.5 min on an H100)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a plumbing check (CPU works)")
    args = parser.parse_args()
    start = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    sections = args.sections.split(",")
    record: dict[str, Any] = {"failures": []}

    def guarded(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as exc:  # one failed section must not lose the others' figures
            traceback.print_exc()
            record["failures"].append({"section": name, "error": f"{type(exc).__name__}: {exc}"})
            return None

    ceils = guarded("ceilings", ceilings) if on_cuda else {}
    record["ceilings"] = ceils
    print(f"[ceilings] {ceils}", flush=True)
    if on_cuda and "kv_decode" in sections:
        record["kv_decode"] = guarded("kv_decode", lambda: kv_decode(ceils.get("copy_gbps", 3000.0)))
    if on_cuda and "gemm" in sections:
        record["gemm"] = guarded("gemm", gemm)
    if "engine" in sections:
        record["engine"] = guarded("engine", lambda: engine_runs(args, ceils or {}, start + args.budget_s))
    record["wall_s"] = time.perf_counter() - start
    path = write_record(Path(args.out), "gpu_fp8", **record)
    print(f"wrote {path} in {record['wall_s']:.0f} s")
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
