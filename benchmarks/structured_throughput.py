"""Decode throughput with a JSON-schema constraint on every row vs unconstrained, same engine, same run.

Each batch size runs the same prompts unconstrained (ignore_eos, max_tokens) and constrained by a JSON schema
that cannot end within max_tokens (an array with a large minItems), so both must produce exactly
batch x max_tokens tokens; a run that does not (or a constrained output the grammar rejects) is reported as
an error, with no ratio, and the script exits 1. Also reported: grammar compile time (cold and cached), the
per-row host mask time along a constrained output (one row, serial), and the engine's batched mask fill per
step during the constrained run (all rows in one multithreaded xgrammar call, overlapped with the forward).

CPU (embedded SmolLM2, its real tokenizer):
    PYTHONPATH=$PWD python benchmarks/structured_throughput.py --batch-sizes 8 32 --max-tokens 32
GPU (H100, Llama-3-8B shape, random weights; a BPE-like synthetic vocabulary of the model's size stands in
for the tokenizer (structured/synthetic_vocab.py); needs xgrammar installed):
    python benchmarks/structured_throughput.py --preset llama3-8b --batch-sizes 64 256 --max-tokens 128
Writes $OUT/structured_throughput.json when $OUT is set, else benchmarks/results/structured_throughput_<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from tokenmill.structured.synthetic_vocab import synthetic_tokenizer_info

ROOT = Path(__file__).resolve().parents[1]
ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "name": {"type": "string", "maxLength": 12},
                                         "kind": {"enum": ["a", "b", "c"]}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "kind", "ok"]}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 10000}  # never finishes within max_tokens


def run(llm: LLM, prompts: list[list[int]], max_tokens: int, constrained: bool) -> dict:
    spec = {"json": SCHEMA} if constrained else None
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, structured_outputs=spec)
    engine = llm.engine
    if engine.config.model.device.startswith("cuda"):
        torch.cuda.synchronize()
    fills = dataclasses.replace(engine.runner.sampler.grammar_bitmask.stats)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    after = engine.runner.sampler.grammar_bitmask.stats
    token_ids = [o.outputs[0].token_ids for o in outputs]
    tokens = sum(len(ids) for ids in token_ids)
    result = {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
              "sample_text": outputs[0].outputs[0].text[:120], "token_ids": token_ids}
    if constrained and after.num_fills > fills.num_fills:  # the engine's batched fills during this run
        steps, rows = after.num_fills - fills.num_fills, after.num_rows - fills.num_rows
        seconds = after.fill_seconds - fills.fill_seconds
        result["batched_fill"] = {"steps": steps, "rows": rows, "ms_per_step": seconds / steps * 1e3,
                                  "us_per_row": seconds / rows * 1e6}
    return result


def problems(llm: LLM, free: dict, constrained: dict, expected: int) -> list[str]:
    """Why this pair must not give a ratio: a token count other than batch x max_tokens, or a constrained
    output the grammar rejects (the mask did not hold)."""
    import xgrammar as xgr

    found = [f"{name} run produced {run['tokens']} tokens, expected {expected}"
             for name, run in (("unconstrained", free), ("constrained", constrained)) if run["tokens"] != expected]
    compiled = llm.engine.grammars.compile(StructuredOutputsParams(json=SCHEMA))
    for row, ids in enumerate(constrained["token_ids"]):
        matcher = xgr.GrammarMatcher(compiled)
        rejected = next((i for i, token in enumerate(ids) if not matcher.accept_token(token)), None)
        if rejected is not None:
            found.append(f"constrained row {row}: the grammar rejects its token {rejected} (id {ids[rejected]})")
            break
    return found


def mask_times(grammars: GrammarCompiler, token_ids: list[int], vocab: int) -> list[float]:
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(grammars.compile(StructuredOutputsParams(json=SCHEMA)))
    return xgrammar_mask_times(matcher, token_ids, vocab)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="random-weights preset (default: embedded SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate unconstrained/constrained runs this many times; keep each one's fastest "
                             "(a shared CPU box is noisy)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    kwargs = {"random_weights": args.preset} if args.preset else {}
    llm = LLM(None, device=args.device, max_num_seqs=max(args.batch_sizes), **kwargs)
    engine = llm.engine
    vocab = engine.model.vocab_size
    vocabulary_s = None
    if args.preset:  # a random-weight preset's tokenizer cannot spell JSON: a BPE-like vocabulary of its size
        start = time.perf_counter()
        info = synthetic_tokenizer_info(vocab, engine.eos_token_ids)
        vocabulary_s = time.perf_counter() - start  # generating it (a real tokenizer is read inside "cold")
        engine.grammars = GrammarCompiler(None, vocab, engine.eos_token_ids, tokenizer_info=info)
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
    rows, errors = [], []
    for batch in args.batch_sizes:
        prompts = [[rng.randrange(100, min(vocab, 30000)) for _ in range(args.prompt_len)] for _ in range(batch)]
        # Warm-up both paths at this batch size (Triton specializes the mask kernel on its row count).
        run(llm, prompts, 4, False)
        run(llm, prompts, 4, True)
        free, constrained = None, None
        for _ in range(args.repeats):
            f, c = run(llm, prompts, args.max_tokens, False), run(llm, prompts, args.max_tokens, True)
            free = f if free is None or f["tokens_per_s"] > free["tokens_per_s"] else free
            constrained = c if constrained is None or c["tokens_per_s"] > constrained["tokens_per_s"] else constrained
        found = problems(llm, free, constrained, batch * args.max_tokens)
        errors += [f"batch {batch}: {p}" for p in found]
        masks = [t * 1e6 for t in mask_times(engine.grammars, constrained["token_ids"][0], vocab)]
        free.pop("token_ids")
        constrained.pop("token_ids")
        rows.append({"batch": batch, "unconstrained": free, "constrained": constrained,
                     "ratio": None if found else constrained["tokens_per_s"] / free["tokens_per_s"],
                     "mask_us_median": statistics.median(masks), "mask_us_max": max(masks)})

    device = (torch.cuda.get_device_name() if engine.config.model.device.startswith("cuda")
              else f"CPU {platform.machine()} ({os.cpu_count()} cores)")
    load_after = os.getloadavg()
    print(f"{device}, model {engine.model_name}, vocab {vocab}, max_tokens {args.max_tokens}, "
          f"load average {load_before[0]:.1f} -> {load_after[0]:.1f}")
    made = f"; synthetic vocabulary made in {vocabulary_s * 1e3:.0f} ms before" if vocabulary_s is not None else ""
    print(f"compile: cold {cold * 1e3:.1f} ms (incl. preparing the vocabulary{made}), new schema "
          f"{cold_second * 1e3:.1f} ms, cached {cached * 1e6:.1f} µs")
    print(f"{'batch':>6}{'free tok/s':>12}{'json tok/s':>12}{'ratio':>8}{'mask µs p50':>13}{'max':>9}"
          f"{'fill ms/step':>14}{'µs/row':>8}")
    for r in rows:
        fill = r["constrained"].get("batched_fill", {})
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"{r['batch']:>6}{r['unconstrained']['tokens_per_s']:>12.1f}{r['constrained']['tokens_per_s']:>12.1f}"
              f"{ratio:>8}{r['mask_us_median']:>13.1f}{r['mask_us_max']:>9.1f}"
              f"{fill.get('ms_per_step', float('nan')):>14.2f}{fill.get('us_per_row', float('nan')):>8.1f}")
    for error in errors:
        print(f"ERROR (no ratio reported): {error}")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "device": device,
        "command": "python " + shlex.join(sys.argv), "model": engine.model_name, "vocab_size": vocab,
        "grammar_vocabulary": "synthetic BPE-like (structured/synthetic_vocab.py)" if args.preset else "tokenizer",
        "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats, "schema": SCHEMA,
        "load_average_before": load_before, "load_average_after": load_after,
        "synthetic_vocabulary_ms": vocabulary_s * 1e3 if vocabulary_s is not None else None,
        "compile_cold_ms": cold * 1e3, "compile_new_schema_ms": cold_second * 1e3, "compile_cached_us": cached * 1e6,
        "rows": rows, "errors": errors,
    }
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    name = "structured_throughput.json" if os.environ.get("OUT") else \
        f"structured_throughput_{datetime.now(UTC):%Y-%m-%d}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_dir / name}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
