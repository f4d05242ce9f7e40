"""FP8 quality on CPU (issue 22): sliding-window perplexity of a model with FP8 weights (``--quantization fp8``),
an FP8 KV cache (scales 1.0, or calculated from the first window) and both, against the same model unquantized.

Same windows and text as ``tokenmill eval perplexity`` (quantization/perplexity.py: its ``window_spans`` and
bundled held-out text); here each window's prefill goes through a cache of the variant's KV dtype. The target
is each variant within 1% of the reference perplexity. CPU emulates FP8 (torch float8 casts), so the numbers
are the FP8 formats' rounding, not a GPU's arithmetic order.

    python benchmarks/fp8_perplexity.py --out benchmarks/results/fp8_perplexity_smollm2_DATE.json   # ~2 min
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_record import write_record  # noqa: E402
from tokenmill.attention.kv_cache import KVCache  # noqa: E402
from tokenmill.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from tokenmill.config import CacheConfig, ModelConfig  # noqa: E402
from tokenmill.model import load_model  # noqa: E402
from tokenmill.quantization.calibration import HELDOUT_TEXT, read_text  # noqa: E402
from tokenmill.quantization.perplexity import window_spans  # noqa: E402

VARIANTS = {  # name -> (--quantization, --kv-cache-dtype, calculate KV scales)
    "reference": (None, "auto", False),
    "fp8_weights": ("fp8", "auto", False),
    "fp8_kv_scale1": (None, "fp8", False),
    "fp8_kv_calculated": (None, "fp8", True),
    "fp8_weights_and_kv": ("fp8", "fp8", True),
}


def perplexity(model_path: str | None, quantization: str | None, kv_dtype: str, calculate: bool,
               ids: list[int], window: int, stride: int, block_size: int = 16) -> float:
    loaded = load_model(ModelConfig(model=model_path, dtype="float32", device="cpu", quantization=quantization),
                        TorchAttentionBackend())
    model = loaded.model
    spec = CacheConfig(block_size=block_size, cache_dtype=kv_dtype).kv_cache_spec(
        model.num_kv_heads, model.head_dim, torch.float32)
    tokens = torch.tensor(ids)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i, (begin, end, first) in enumerate(window_spans(len(ids), min(window, loaded.max_model_len), stride)):
            n = end - begin
            caches = KVCache(spec, model.num_layers, spec.blocks_for_tokens(n), "cpu")
            if calculate and i == 0:  # scales from the first window, kept for the rest (as in serving)
                caches.arm_scale_calculation()
            meta = model.attn_backend.build_metadata([n], [n], [list(range(spec.blocks_for_tokens(n)))],
                                                     block_size, "cpu")
            logits = model.compute_logits(model(tokens[begin:end], torch.arange(n), caches, meta)).float()
            nll += F.cross_entropy(logits[first - 1 - begin : end - 1 - begin], tokens[first:end],
                                   reduction="sum").item()
            count += end - first
    return math.exp(nll / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF dir or .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (CPU time is scarce)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    reference = load_model(ModelConfig(model=args.model, dtype="float32", device="cpu"), TorchAttentionBackend())
    ids = reference.tokenizer.encode(read_text(None, HELDOUT_TEXT), add_special_tokens=False)[: args.max_tokens]
    del reference
    rows = []
    for name in args.variants.split(","):
        quantization, kv_dtype, calculate = VARIANTS[name]
        start = time.perf_counter()
        ppl = perplexity(args.model, quantization, kv_dtype, calculate, ids, args.window, args.stride)
        rows.append({"variant": name, "quantization": quantization, "kv_cache_dtype": kv_dtype,
                     "calculate_kv_scales": calculate, "perplexity": ppl, "seconds": time.perf_counter() - start})
        print(f"{name:>20}: perplexity {ppl:.3f}", flush=True)
    base = next((r["perplexity"] for r in rows if r["variant"] == "reference"), None)
    for row in rows:
        row["vs_reference_pct"] = None if base is None else 100.0 * (row["perplexity"] / base - 1.0)
    print("\n| variant | perplexity | vs reference |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['perplexity']:.3f} | {row['vs_reference_pct']} |")
    write_record(Path(args.out), "fp8_perplexity", device="cpu (FP8 emulated by torch casts)",
                 model=args.model or "embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
                 num_tokens=len(ids), window=args.window, stride=args.stride, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
