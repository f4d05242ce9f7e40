"""Perplexity table for issue 20: a model as tokenmill serves it (the reference) against its RTN / GPTQ / AWQ
quantizations written by ``tokenmill quantize`` and served from their packed weights.

Default model: the embedded SmolLM2-135M-Instruct (a Q4_1 GGUF; tokenmill dequantizes it at load, and that
dequantized model is the reference every method re-quantizes). Its hidden size 576 is not a multiple of 128,
so the default group size is 64. Text: the bundled held-out KJV excerpt (disjoint from the calibration text).

    python3 benchmarks/quantized_perplexity.py --out benchmarks/results/quantized_perplexity.json          # CPU
    python3 benchmarks/quantized_perplexity.py --device cuda --dtype bfloat16 --out $OUT/ppl.json           # GPU
(GGUF sources need the `gguf` package, which transformers uses to read them.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.quantization.checkpoint import save_quantized  # noqa: E402
from tokenmill.quantization.perplexity import PerplexityConfig, evaluate_perplexity  # noqa: E402
from tokenmill.quantization.quantizer import QuantizeConfig, load_source_model, quantize_model  # noqa: E402

VARIANTS = ("rtn:4", "gptq:4", "awq:4", "rtn:8", "gptq:8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded SmolLM2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="method:bits list")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quantized_perplexity.json"))
    args = parser.parse_args()
    if args.model is None:
        from tokenmill.model.loader import embedded_model_path

        args.model = str(embedded_model_path())

    def perplexity(model: str) -> dict:
        return evaluate_perplexity(PerplexityConfig(model=model, max_tokens=args.max_tokens, dtype=args.dtype,
                                                    device=args.device))

    rows = [{"variant": "reference", **perplexity(args.model)}]
    print(f"reference: {rows[0]['perplexity']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for variant in args.variants.split(","):
            method, bits = variant.split(":")
            config = QuantizeConfig(method=method, bits=int(bits), group_size=args.group_size,
                                    num_samples=args.num_samples, seq_len=args.seq_len, device=args.device)
            started = time.perf_counter()
            model, tokenizer = load_source_model(args.model)
            result = quantize_model(model, tokenizer, config, progress=False)
            out = save_quantized(model, tokenizer, result, config, Path(scratch) / variant.replace(":", "_"))
            seconds = time.perf_counter() - started
            mean_err = sum(r.rel_error for r in result.reports) / len(result.reports)
            row = {"variant": f"{method}-{bits} g{args.group_size}", "quantize_seconds": round(seconds, 1),
                   "mean_layer_rel_error": mean_err, **perplexity(str(out))}
            row["vs_reference_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
            rows.append(row)
            print(f"{row['variant']}: {row['perplexity']:.4f} ({row['vs_reference_pct']:+.2f}%), mean layer error "
                  f"{mean_err:.4f}, quantized in {seconds:.0f} s", flush=True)
    print(f"\n{'variant':<16} {'perplexity':>10} {'vs ref':>8}")
    for row in rows:
        print(f"{row['variant']:<16} {row['perplexity']:10.4f} {row.get('vs_reference_pct', 0.0):+7.2f}%")
    record = {
        "benchmark": "quantized_perplexity",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "command": shlex.join(["python3", *sys.argv]),
        "model": args.model, "group_size": args.group_size, "num_samples": args.num_samples,
        "seq_len": args.seq_len, "max_tokens": args.max_tokens, "dtype": args.dtype, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
