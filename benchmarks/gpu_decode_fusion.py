"""Decode-step A/B of two launch-overhead cuts, on the engine's own CUDA graphs (one process, one GPU):
programmatic dependent launch (PDL) of the Triton kernels, and SiLU-and-mul fused into the down projection.

For each batch size a Llama-shaped model with random weights (every layer, lm_head included) is captured as
the engine captures a decode step (runner/cuda_graphs.DecodeGraphs), once per variant, and the replays are
timed round-robin across variants (CUDA events per replay, median). Each time is reported against the
step's bandwidth floor: (weights + KV read) / the copy rate measured in the same run. The variants' logits
are compared with the baseline (greedy tokens must agree; values within bf16 rounding).

    python benchmarks/gpu_decode_fusion.py --out $OUT/decode_fusion.json      # H100, ~2 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.attention.backend import allocate_kv_cache  # noqa: E402
from tokenmill.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from tokenmill.kernels import _triton  # noqa: E402
from tokenmill.model.layers import Linear  # noqa: E402
from tokenmill.model.loader import build_model, init_random_weights  # noqa: E402
from tokenmill.model.presets import preset_spec  # noqa: E402
from tokenmill.runner.cuda_graphs import DecodeGraphs  # noqa: E402
from tokenmill.runner.linear_tuning import tune_linears  # noqa: E402

BLOCK_SIZE = 16
VARIANTS = {  # name -> (programmatic dependent launch, fused SiLU-and-mul down projection where tuned)
    "baseline": (False, False),
    "fused_act": (False, True),
    "pdl": (True, False),
    "pdl+fused_act": (True, True),
}


def copy_rate_gbps() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * src.numel() * 4 / statistics.median(times) / 1e6


def fill_batch(graphs: DecodeGraphs, batch: int, context: int, vocab: int, seed: int) -> None:
    """``batch`` sequences of ``context`` cached tokens, each decoding its next token (distinct blocks)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = -(-(context + 1) // BLOCK_SIZE)
    table = torch.arange(batch * blocks_per_seq, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    graphs.block_tables[:batch, :blocks_per_seq].copy_(table)
    graphs.input_ids[:batch].copy_(torch.randint(0, vocab, (batch,), device="cuda", generator=gen))
    graphs.positions[:batch].fill_(context)
    slots = table[:, context // BLOCK_SIZE].long() * BLOCK_SIZE + context % BLOCK_SIZE
    graphs.slot_mapping[:batch].copy_(slots)
    graphs.seq_lens[:batch].fill_(context + 1)


def set_variant(model: torch.nn.Module, gated_plans: dict[str, Any], pdl: bool, fused: bool) -> None:
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.gated_input:
            module.gated_plan = gated_plans[name] if fused else {}
    # The hardware probe decides PDL; switching it off here is this benchmark's A/B, not an engine knob.
    _triton._device_has_pdl = _PROBE if pdl else _no_pdl


_PROBE = _triton._device_has_pdl


def _no_pdl(device_index: int) -> bool:
    return False


@torch.inference_mode()
def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = preset_spec(args.preset)
    model = build_model(spec, TritonAttentionBackend(), torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    batches = [int(b) for b in args.batches.split(",")]
    tune_linears(model, max_rows=max(batches))
    gated_plans = {n: dict(m.gated_plan) for n, m in model.named_modules() if isinstance(m, Linear) and m.gated_input}
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    kv_token_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 2
    blocks_per_seq = -(-(args.context + 1) // BLOCK_SIZE)
    kv_caches = allocate_kv_cache(spec.num_layers, max(batches) * blocks_per_seq, BLOCK_SIZE, spec.num_kv_heads,
                                  spec.head_dim, torch.bfloat16, torch.device("cuda"))
    for cache in kv_caches:
        cache.normal_()
    copy_gbps = copy_rate_gbps()
    print(f"{args.preset}: weights {weight_bytes / 1e9:.2f} GB, context {args.context}, copy rate {copy_gbps:.0f} GB/s; "
          f"fused down projection at rows {sorted(next(iter(gated_plans.values()), {}))}", flush=True)
    rows = []
    for batch in batches:
        graphs: dict[str, DecodeGraphs] = {}
        logits: dict[str, torch.Tensor] = {}
        for name, (pdl, fused) in VARIANTS.items():
            set_variant(model, gated_plans, pdl, fused)
            g = DecodeGraphs(model, kv_caches, BLOCK_SIZE, batch, blocks_per_seq, torch.device("cuda"))
            g.sizes, g.max_batch = [batch], batch
            fill_batch(g, batch, args.context, spec.vocab_size, seed=batch)
            g.capture()
            g.graphs[batch].replay()
            torch.cuda.synchronize()
            graphs[name], logits[name] = g, g.outputs[batch].clone()
        set_variant(model, gated_plans, True, True)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):  # round-robin: clock and thermal drift hit every variant alike
            for name, g in graphs.items():
                for _ in range(args.replays):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    g.graphs[batch].replay()
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end))
        floor_ms = (weight_bytes + batch * (args.context + 1) * kv_token_bytes) / copy_gbps / 1e6
        base = logits["baseline"]
        for name, samples in times.items():
            ms = statistics.median(samples)
            err = ((logits[name] - base).norm() / base.norm()).item()
            same = bool(torch.equal(logits[name].argmax(-1), base.argmax(-1)))
            rows.append({"batch": batch, "variant": name, "median_ms": ms, "roofline_pct": 100 * floor_ms / ms,
                         "speedup_vs_baseline": statistics.median(times["baseline"]) / ms,
                         "logits_rel_err_vs_baseline": err, "greedy_tokens_equal_baseline": same})
            print(f"batch {batch:>4} {name:<14} {ms:7.3f} ms  {100 * floor_ms / ms:5.1f}% of roofline  "
                  f"{rows[-1]['speedup_vs_baseline']:.3f}x  logits rel err {err:.1e}  greedy equal {same}", flush=True)
        del graphs, logits
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "weight_bytes": weight_bytes, "gated_plans_rows": sorted(next(iter(gated_plans.values()), {})),
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--context", type=int, default=384, help="cached tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    record = {"benchmark": "gpu_decode_fusion", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "command": shlex.join(["python3", "benchmarks/gpu_decode_fusion.py", *sys.argv[1:]]), **run(args)}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
