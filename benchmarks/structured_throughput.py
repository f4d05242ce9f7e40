"""Decode throughput with a JSON-schema constraint on every row vs unconstrained, same engine, same run.

Each batch size runs the same prompts twice: unconstrained (ignore_eos, max_tokens) and constrained by a JSON
schema that cannot end within max_tokens (an array with a large minItems), so both produce exactly
batch x max_tokens tokens. Also reported: grammar compile time (cold and cached) and the per-row host mask
time along a constrained output. Constrained steps run synchronously (the next mask needs the last token),
so on CUDA the ratio includes the lost CPU/GPU overlap.

CPU (embedded SmolLM2, its real tokenizer):
    PYTHONPATH=$PWD python benchmarks/structured_throughput.py --batch-sizes 8 32 --max-tokens 32
GPU (H100, Llama-3-8B shape, random weights; a synthetic 128k byte-level vocabulary stands in for the
tokenizer; needs xgrammar installed):
    python benchmarks/structured_throughput.py --preset llama3-8b --batch-sizes 64 256 --max-tokens 128
Writes $OUT/structured_throughput.json when $OUT is set, else benchmarks/results/structured_throughput_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from structured_backends import xgrammar_mask_times  # benchmarks/ is on sys.path when run as a script

from tokenmill import LLM, SamplingParams
from tokenmill.structured.compiler import GrammarCompiler
from tokenmill.structured.params import StructuredOutputsParams

ROOT = Path(__file__).resolve().parents[1]
ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "name": {"type": "string", "maxLength": 12},
                                         "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "kind", "ok"]}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 10000}  # never finishes within max_tokens


def synthetic_tokenizer_info(vocab_size: int, eos: list[int]):
    """A byte-level-like vocabulary: the 256 single bytes plus random printable pieces of 2-8 characters."""
    import xgrammar as xgr

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-.,:;\"'{}[]()\n\t"
    vocab = [chr(b) if 32 <= b < 127 else f"<0x{b:02X}>" for b in range(256)]
    seen = set(vocab)
    while len(vocab) < vocab_size:
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 8)))
        if piece not in seen:
            seen.add(piece)
            vocab.append(piece)
    return xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=eos)


def run(llm: LLM, prompts: list[list[int]], max_tokens: int, constrained: bool) -> dict:
    spec = {"json": SCHEMA} if constrained else None
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=spec)
    if llm.engine.config.model.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "sample_text": outputs[0].outputs[0].text[:120], "token_ids": outputs[0].outputs[0].token_ids}


def mask_times(grammars: GrammarCompiler, token_ids: list[int], vocab: int) -> list[float]:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammars.compile(StructuredOutputsParams(json=SCHEMA)))
    return xgrammar_mask_times(matcher, token_ids, vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="random-weights preset (default: embedded SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    args = parser.parse_args()

    kwargs = {"random_weights": args.preset} if args.preset else {}
    llm = LLM(None, device=args.device, max_num_seqs=max(args.batch_sizes), **kwargs)
    engine = llm.engine
    vocab = engine.model.vocab_size
    if engine.tokenizer is None:  # random-weight presets: a synthetic vocabulary of the model's size
        engine.grammars = GrammarCompiler(None, vocab, engine.eos_token_ids,
                                          tokenizer_info=synthetic_tokenizer_info(vocab, sorted(engine.eos_token_ids)))
    spec = StructuredOutputsParams(json=SCHEMA)
    start = time.perf_counter()
    engine.grammars.compile(spec)
    cold = time.perf_counter() - start  # includes preparing the vocabulary once
    start = time.perf_counter()
    engine.grammars.compile(StructuredOutputsParams(json={**SCHEMA, "minItems": 9999}))
    cold_second = time.perf_counter() - start  # a new schema, vocabulary ready
    start = time.perf_counter()
    engine.grammars.compile(spec)
    cached = time.perf_counter() - start

    rng = random.Random(0)
    rows = []
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(100, min(vocab, 30000)) for _ in range(args.prompt_len)] for _ in range(batch)]
        run(llm, prompts[: min(batch, 4)], 4, False)  # warm-up both paths
        run(llm, prompts[: min(batch, 4)], 4, True)
        free = run(llm, prompts, args.max_tokens, False)
        constrained = run(llm, prompts, args.max_tokens, True)
        masks = [t * 1e6 for t in mask_times(engine.grammars, constrained.pop("token_ids"), vocab)]
        free.pop("token_ids")
        rows.append({"batch": batch, "unconstrained": free, "constrained": constrained,
                     "ratio": constrained["tokens_per_s"] / free["tokens_per_s"],
                     "mask_us_median": statistics.median(masks), "mask_us_max": max(masks)})

    device = (torch.cuda.get_device_name() if engine.config.model.device.startswith("cuda")
              else f"CPU {platform.machine()} ({os.cpu_count()} cores)")
    print(f"{device}, model {engine.model_name}, vocab {vocab}, max_tokens {args.max_tokens}")
    print(f"compile: cold {cold * 1e3:.1f} ms (incl. vocabulary), new schema {cold_second * 1e3:.1f} ms, "
          f"cached {cached * 1e6:.1f} µs")
    print(f"{'batch':>6}{'free tok/s':>12}{'json tok/s':>12}{'ratio':>8}{'mask µs p50':>13}{'max':>9}")
    for r in rows:
        print(f"{r['batch']:>6}{r['unconstrained']['tokens_per_s']:>12.1f}{r['constrained']['tokens_per_s']:>12.1f}"
              f"{r['ratio']:>8.3f}{r['mask_us_median']:>13.1f}{r['mask_us_max']:>9.1f}")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": device,
        "command": "python " + shlex.join(sys.argv), "model": engine.model_name, "vocab_size": vocab,
        "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "schema": SCHEMA,
        "compile_cold_ms": cold * 1e3, "compile_new_schema_ms": cold_second * 1e3, "compile_cached_us": cached * 1e6,
        "rows": rows,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    name = "structured_throughput.json" if os.environ.get("OUT") else \
        f"structured_throughput_{datetime.now(UTC):%Y-%m-%d}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir / name}")


if __name__ == "__main__":
    main()
