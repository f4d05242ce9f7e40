"""Where a large decode step's time goes outside the kernels, and whether the KV cache's size or block order
slows decode attention.

Workload (d)'s largest step (Llama-3-8B shape, random weights, 256 sequences x ~544 cached tokens) on one engine:
1. engine step: the median decode step as workload (d) measures it (``gpu_vs_transformers.decode_sweep``);
2. graph replay: the same batch's captured graph replayed back to back (no input copies, no sampling, no host);
3. kernel sum: the replay's kernels by the profiler, so replay - kernel sum = gaps between kernels in the graph;
4. PDL A/B/A: graphs re-captured with programmatic dependent launch at every row count, then at the default;
   staging A/B/A: the graph inputs filled by the one-launch staging kernel, then by the torch ops it replaced;
5. attention footprint: the decode kernel over all layers' engine-sized caches with contiguous, compact-random
   and whole-cache-random block tables, and over one small cache (as in gpu_kernels.py).

    python3 benchmarks/gpu_step_anatomy.py --out $OUT/anatomy.json           # H100, ~4 min
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_profile import gpu_gaps  # noqa: E402  (sibling benchmark module)
from gpu_record import write_record  # noqa: E402
from gpu_vs_transformers import Sizes, decode_sweep, max_sweep_len  # noqa: E402

import tokenmill.kernels._triton as triton_helpers  # noqa: E402
import tokenmill.runner.cuda_graphs as cuda_graphs  # noqa: E402
from tokenmill.bench.roofline import H100_COPY_GBPS, H100_MATMUL_TFLOPS, Ceilings  # noqa: E402
from tokenmill.bench.throughput import warm_up_mixed_steps  # noqa: E402
from tokenmill.cuda_timing import median_event_ms  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.kernels.paged_attention import paged_decode, plan_decode  # noqa: E402
from tokenmill.model.linear import matmul_layers  # noqa: E402


def step_median_ms(engine: LLMEngine, batch: int, repeats: int, ceilings: Ceilings) -> dict[str, Any]:
    sizes = Sizes(a=(1, 1, 1), b=(1, 1), c=(1, 1, 1, 1), d_batches=(batch,), d_lens=(512, 32))
    rows = [decode_sweep(engine, sizes, ceilings, seed=i)[0] for i in range(repeats)]
    return {"median_step_ms": [r["median_step_ms"] for r in rows], "roofline_pct": [r["roofline_pct"] for r in rows],
            "roofline_ms": rows[0]["roofline_ms"]}


def linear_plans(engine: LLMEngine) -> dict[str, dict[int, str]]:
    """The start-up tuner's choice per weight shape: row count -> Triton config (cuBLAS where absent)."""
    plans = {}
    for _, module in matmul_layers(engine.model):
        n, k = module.weight.shape
        plans[f"{n}x{k}"] = {rows: config.name for rows, config in sorted(module.gemm_plan.items())}
    return plans


def replay_anatomy(engine: LLMEngine, batch: int, out_dir: Path) -> dict[str, Any]:
    """Back-to-back replays of the batch's graph (inputs as the last step left them), and its kernels."""
    graph = engine.runner.graphs.graphs[batch]
    replay_ms = median_event_ms(graph.replay, 30)
    replays = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    trace = out_dir / f"replay_{batch}.json"
    prof.export_chrome_trace(str(trace))
    gaps = gpu_gaps(trace, top=8)
    kernel_ms = gaps["busy_us"] / 1e3 / replays
    return {"replay_ms": replay_ms, "kernel_ms": kernel_ms, "in_graph_gap_ms": gaps["idle_us"] / 1e3 / replays,
            "top_gaps": gaps["top_gaps"]}


def recapture(engine: LLMEngine, pdl_max_rows: int) -> None:
    old = engine.runner.graphs
    max_batch, max_len = old.max_batch, old.max_blocks * old.block_size
    engine.runner.graphs = None
    del old
    gc.collect()
    torch.cuda.empty_cache()
    triton_helpers.PDL_MAX_ROWS = pdl_max_rows
    engine.runner.capture_graphs(max_batch, max_len)


def attention_footprint(engine: LLMEngine, batch: int, seq_len: int) -> list[dict[str, Any]]:
    caches = engine.runner.kv_caches
    num_blocks, block_size, num_kv_heads, head_dim = caches[0].shape[1:]
    num_heads = engine.model.spec.num_heads
    per_seq = -(-seq_len // block_size)
    needed = batch * per_seq
    gen = torch.Generator().manual_seed(0)
    tables = {
        "contiguous": torch.arange(needed).view(batch, per_seq),
        "random_compact": torch.randperm(needed, generator=gen).view(batch, per_seq),
        "random_whole_cache": torch.randperm(num_blocks, generator=gen)[:needed].view(batch, per_seq),
    }
    q = torch.randn(batch, num_heads, head_dim, device="cuda").to(caches[0].dtype)
    lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = plan_decode(batch, num_kv_heads, per_seq * block_size, sms)
    kv_bytes = batch * seq_len * num_kv_heads * head_dim * 2 * caches[0].element_size()
    small = torch.randn(2, needed, block_size, num_kv_heads, head_dim, device="cuda").to(caches[0].dtype)
    cases = [(name, caches, t) for name, t in tables.items()] + [("small_cache_random", [small] * len(caches),
                                                                   tables["random_compact"])]
    rows = []
    for name, layer_caches, table in cases:
        table = table.to(torch.int32).cuda()

        def all_layers(layer_caches: list[torch.Tensor] = layer_caches, table: torch.Tensor = table) -> None:
            for cache in layer_caches:
                paged_decode(q, cache, table, lens, head_dim**-0.5, plan=plan, out=out)

        all_layers()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            all_layers()
        per_layer_us = 1e3 * median_event_ms(graph.replay, 20) / len(layer_caches)
        rows.append({"tables": name, "cache_blocks": int(layer_caches[0].shape[1]), "per_layer_us": per_layer_us,
                     "tb_per_s": kv_bytes / per_layer_us / 1e6})
        print(f"attention {name:<20} {per_layer_us:7.1f} us a layer, {rows[-1]['tb_per_s']:.2f} TB/s", flush=True)
        del graph
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON path; the replay traces go next to it")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="(d) runs per variant")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--parts", default="pdl,stage,footprint",
                        help="optional parts to run: pdl, stage, footprint (comma list)")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ceilings = Ceilings(H100_COPY_GBPS, H100_MATMUL_TFLOPS)
    sizes = Sizes(a=(1, 1, 1), b=(1, 1), c=(1, 1, 1, 1), d_batches=(args.batch,), d_lens=(512, 32))
    t0 = time.perf_counter()
    engine = LLMEngine.from_kwargs(random_weights="llama3-8b", dtype="bfloat16", device="cuda",
                                   max_model_len=max_sweep_len(sizes, args.max_num_batched_tokens) + 16,
                                   max_num_batched_tokens=args.max_num_batched_tokens, stream_outputs=False)
    warm_up_mixed_steps(engine, engine.model.spec.vocab_size, 256, 8, temperature=0.0)
    print(f"engine ready in {time.perf_counter() - t0:.0f} s", flush=True)
    record: dict[str, Any] = {"batch": args.batch, "pdl_max_rows_default": triton_helpers.PDL_MAX_ROWS,
                              "linear_plans": linear_plans(engine)}
    print(f"tuned linears (rows -> Triton config): {record['linear_plans']}", flush=True)
    default_rows = triton_helpers.PDL_MAX_ROWS
    record["step"] = step_median_ms(engine, args.batch, args.repeats, ceilings)
    record["replay"] = replay_anatomy(engine, args.batch, out.parent)
    print(f"step {record['step']['median_step_ms']} ms; replay {record['replay']['replay_ms']:.3f} ms; kernels "
          f"{record['replay']['kernel_ms']:.3f} ms; in-graph gaps {record['replay']['in_graph_gap_ms']:.3f} ms",
          flush=True)
    parts = set(args.parts.split(",")) - {""}
    record["pdl_ab"] = []
    for rows in () if "pdl" not in parts else (1 << 20, default_rows, 1 << 20, default_rows):
        recapture(engine, rows)
        entry = {"pdl_max_rows": rows, **step_median_ms(engine, args.batch, args.repeats, ceilings),
                 "replay_ms": median_event_ms(engine.runner.graphs.graphs[args.batch].replay, 30)}
        record["pdl_ab"].append(entry)
        print(f"PDL up to {rows} rows: steps {[round(x, 3) for x in entry['median_step_ms']]} ms, "
              f"replay {entry['replay_ms']:.3f} ms", flush=True)
    record["stage_ab"] = []
    for kernel in () if "stage" not in parts else (False, True, False, True):
        cuda_graphs.HAS_TRITON = kernel  # False: DecodeGraphs.run stages with the reference torch ops
        entry = {"staging": "kernel" if kernel else "torch ops", **step_median_ms(engine, args.batch, args.repeats,
                                                                                   ceilings)}
        record["stage_ab"].append(entry)
        print(f"staging by {entry['staging']}: steps {[round(x, 3) for x in entry['median_step_ms']]} ms", flush=True)
    if "footprint" in parts:
        record["attention_footprint"] = attention_footprint(engine, args.batch, 544)
    write_record(out, "gpu_step_anatomy", **record)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
