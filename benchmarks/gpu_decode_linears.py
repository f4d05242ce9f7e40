"""Decode-step A/B of the linear-layer kernel choices, on the engine's own CUDA graphs (one process, one GPU):
cuBLAS everywhere; the start-up tuner choosing between cuBLAS and the tiled GEMM (the engine before the
GEMV); the tuner with the GEMV as a candidate too (the engine's default).

For each batch size a Llama-shaped model with random weights (every layer, lm_head included) is captured as
the engine captures a decode step (runner/cuda_graphs.DecodeGraphs), once per variant, and the replays are
timed round-robin across variants (CUDA events per replay, median). Each time is reported against the
step's bandwidth floor: (weights + KV read) / the copy rate measured in the same run. The variants' logits
are compared with cuBLAS's (greedy tokens should agree; values within bf16 rounding).

    python3 benchmarks/gpu_decode_linears.py --out $OUT/decode_linears.json      # H100, ~2 min

(Earlier versions also A/B'd programmatic dependent launch of the Triton kernels (commit 7907f64) and
SiLU-and-mul fused into the down projection's GEMV (gpu_decode_linears_2026-11-24.json): neither gained.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from gpu_record import write_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention.backend import allocate_kv_cache  # noqa: E402
from tokenmill.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tokenmill.cuda_timing import event_times_ms, median_event_ms  # noqa: E402
from tokenmill.kernels.tiled_gemm import candidates_for as tiled_candidates_for  # noqa: E402
from tokenmill.model.linear import matmul_layers  # noqa: E402
from tokenmill.model.loader import build_model, init_random_weights  # noqa: E402
from tokenmill.model.presets import preset_spec  # noqa: E402
from tokenmill.runner import linear_tuning  # noqa: E402
from tokenmill.runner.cuda_graphs import DecodeGraphs  # noqa: E402

BLOCK_SIZE = 16
VARIANTS = ("cublas", "tiled", "gemv")


def copy_rate_gbps() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_event_ms(lambda: dst.copy_(src), 30) / 1e6


def fill_batch(graphs: DecodeGraphs, batch: int, context: int, vocab: int, seed: int) -> None:
    """``batch`` sequences of ``context`` cached tokens, each decoding its next token (distinct blocks)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-(context + 1) // BLOCK_SIZE)
    table = torch.arange(batch * blocks_per_seq, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    graphs.inputs.block_tables[:batch, :blocks_per_seq].copy_(table)
    graphs.inputs.input_ids[:batch].copy_(torch.randint(0, vocab, (batch,), device="cuda", generator=gen))
    graphs.inputs.positions[:batch].fill_(context)
    slots = table[:, context // BLOCK_SIZE].long() * BLOCK_SIZE + context % BLOCK_SIZE
    graphs.inputs.slot_mapping[:batch].copy_(slots)
    graphs.inputs.seq_lens[:batch].fill_(context + 1)


def tune_plans(model: torch.nn.Module, max_rows: int) -> dict[str, dict[str, dict]]:
    """variant -> module name -> gemm_plan, from the engine's tuner (its candidates narrowed to the tiled
    GEMM for the "tiled" variant)."""
    linears = dict(matmul_layers(model))
    full_candidates = linear_tuning.candidates_for
    plans: dict[str, dict[str, dict]] = {"cublas": {n: {} for n in linears}}
    try:
        linear_tuning.candidates_for = tiled_candidates_for
        linear_tuning.tune_linears(model, max_rows=max_rows)
        plans["tiled"] = {n: dict(m.gemm_plan) for n, m in linears.items()}
    finally:
        linear_tuning.candidates_for = full_candidates
    linear_tuning.tune_linears(model, max_rows=max_rows)
    plans["gemv"] = {n: dict(m.gemm_plan) for n, m in linears.items()}
    return plans


def set_variant(model: torch.nn.Module, plans: dict[str, dict]) -> None:
    for name, module in matmul_layers(model):
        module.gemm_plan = plans[name]


def describe(plans: dict[str, dict]) -> dict[str, dict[str, str]]:
    """Each weight shape's choice per row count (one layer stands for all)."""
    return {name: {str(r): c.name for r, c in sorted(plan.items())} for name, plan in plans.items()
            if not name.startswith("model.layers.") or name.startswith("model.layers.0.")}


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = preset_spec(args.preset)
    model = build_model(spec, TritonAttentionBackend(), torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    plans = tune_plans(model, max(batches))
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_token_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    blocks_per_seq = -(-(args.context + 1) // BLOCK_SIZE)
    kv_caches = allocate_kv_cache(spec.num_layers, max(batches) * blocks_per_seq, BLOCK_SIZE, spec.num_kv_heads,
                                  spec.head_dim, torch.bfloat16, torch.device("cuda"))
    for cache in kv_caches:
        cache.normal_()
    copy_gbps = copy_rate_gbps()
    print(f"{args.preset}: weights {weight_bytes / 1e9:.2f} GB, context {args.context}, copy rate {copy_gbps:.0f} GB/s",
          flush=True)
    for module, choice in describe(plans["gemv"]).items():
        print(f"  {module}: {choice}", flush=True)
    rows = []
    for batch in batches:
        graphs: dict[str, DecodeGraphs] = {}
        logits: dict[str, torch.Tensor] = {}
        for name in VARIANTS:
            set_variant(model, plans[name])
            g = DecodeGraphs(model, kv_caches, BLOCK_SIZE, batch, blocks_per_seq, torch.device("cuda"))
            g.sizes, g.max_batch = [batch], batch
            fill_batch(g, batch, args.context, spec.vocab_size, seed=batch)
            g.capture()
            g.graphs[batch].replay()
            torch.cuda.synchronize()
            graphs[name], logits[name] = g, g.outputs[batch].clone()
        set_variant(model, plans["gemv"])
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):  # round-robin: clock and thermal drift hit every variant alike
            for name, g in graphs.items():
                times[name] += event_times_ms(g.graphs[batch].replay, args.replays)
        floor_ms = (weight_bytes + batch * (args.context + 1) * kv_token_bytes) / copy_gbps / 1e6
        base = logits["cublas"]
        for name, samples in times.items():
            ms = statistics.median(samples)
            err = ((logits[name] - base).norm() / base.norm()).item()
            same = bool(torch.equal(logits[name].argmax(-1), base.argmax(-1)))
            rows.append({"batch": batch, "variant": name, "median_ms": ms, "roofline_pct": 100 * floor_ms / ms,
                         "speedup_vs_cublas": statistics.median(times["cublas"]) / ms,
                         "speedup_vs_tiled": statistics.median(times["tiled"]) / ms,
                         "logits_rel_err_vs_cublas": err, "greedy_tokens_equal_cublas": same})
            print(f"batch {batch:>4} {name:<15} {ms:7.3f} ms  {100 * floor_ms / ms:5.1f}% of roofline  "
                  f"{rows[-1]['speedup_vs_cublas']:.3f}x cuBLAS  {rows[-1]['speedup_vs_tiled']:.3f}x tiled  "
                  f"logits rel err {err:.1e}  greedy equal {same}", flush=True)
        del graphs, logits
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "weight_bytes": weight_bytes, "roofline_bytes": "weights (no embedding table) + KV read",
            "plans": {v: describe(plans[v]) for v in VARIANTS}, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=384, help="cached tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args)
    if args.out:
        write_record(Path(args.out), "gpu_decode_fusion", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
