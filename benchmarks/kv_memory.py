"""Paged vs contiguous KV allocation for the same KV memory (issue 22, "the memory story"), simulated.

Requests (random length ranges or a ShareGPT-format file) queue at once and run to completion: each step admits
waiting requests in order while memory allows, then every running sequence decodes one token. Two allocators:
- contiguous: each request reserves, up front and in one piece (first fit in one address space), either
  ``max_model_len`` tokens or its own prompt + max_tokens (``--reserve``), per sample (``n``);
- paged: blocks of ``--block-size`` tokens taken as the sequence grows (no reservation); ``n`` samples share
  their prompt's full blocks, and with ``--shared-prefix`` every request's first S tokens are one cached copy.
Per allocator it reports the steady batch (mean running sequences), steps to finish (a throughput proxy: steps
are what a GPU pays for), and the time-averaged split of memory into used, internal waste (reserved or
block tails not holding tokens) and external waste (free memory the head-of-line request could not use).
The GPU half of the issue (the engine run both ways) needs an up-front-reservation engine option: not here.

    python benchmarks/kv_memory.py --preset llama3-8b --kv-gib 20 --input-len-range 4:1024 --output-len-range 4:1024
    python benchmarks/kv_memory.py --dataset ShareGPT_V3.json --tokenizer DIR --out kv_memory.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Req:
    prompt: int
    output: int
    n: int = 1


@dataclass
class Tally:
    """Token-steps summed over the run: memory holding tokens, reserved/padded but empty, free but unusable."""

    steps: int = 0
    used: int = 0
    internal: int = 0
    external: int = 0
    running: int = 0  # sequence-steps (a sequence = one sample of a request)
    peak_running: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, capacity: int) -> dict[str, Any]:
        total = capacity * max(self.steps, 1)
        return {"steps": self.steps, "mean_running_seqs": self.running / max(self.steps, 1),
                "peak_running_seqs": self.peak_running, "used_pct": 100 * self.used / total,
                "internal_waste_pct": 100 * self.internal / total, "external_waste_pct": 100 * self.external / total,
                **self.extra}


class FirstFit:
    """A 1-D address space of ``size`` token slots; first-fit allocation of contiguous ranges."""

    def __init__(self, size: int) -> None:
        self.free: list[tuple[int, int]] = [(0, size)]  # sorted (start, length)

    def alloc(self, length: int) -> int | None:
        for i, (start, free_len) in enumerate(self.free):
            if free_len >= length:
                if free_len == length:
                    del self.free[i]
                else:
                    self.free[i] = (start + length, free_len - length)
                return start
        return None

    def release(self, start: int, length: int) -> None:
        i = bisect.bisect(self.free, (start, length))
        self.free.insert(i, (start, length))
        merged: list[tuple[int, int]] = []  # coalesce neighbours
        for s, n in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((s, n))
        self.free = merged

    def total_free(self) -> int:
        return sum(n for _, n in self.free)


def simulate_contiguous(reqs: list[Req], capacity: int, max_model_len: int, reserve: str) -> dict[str, Any]:
    space, queue, running, tally = FirstFit(capacity), list(reqs), [], Tally()
    while queue or running:
        while queue:  # admit in order (FIFO: the head blocks the line, as in a real scheduler)
            r = queue[0]
            per_seq = max_model_len if reserve == "max_model_len" else r.prompt + r.output
            starts = []
            for _ in range(r.n):
                start = space.alloc(per_seq)
                if start is None:
                    break
                starts.append(start)
            if len(starts) < r.n:
                for s in starts:
                    space.release(s, per_seq)
                if not running:
                    raise ValueError(f"a request needs {r.n} x {per_seq} contiguous tokens; the cache holds {capacity}")
                break
            queue.pop(0)
            running.append([r, 0, starts, per_seq])
        tally.steps += 1
        reserved = sum(len(s) * per for _, _, s, per in running)
        used = sum(r.n * (r.prompt + t + 1) for r, t, _, _ in running)
        tally.used += used
        tally.internal += reserved - used
        tally.external += space.total_free() if queue else 0
        seqs = sum(r.n for r, *_ in running)
        tally.running += seqs
        tally.peak_running = max(tally.peak_running, seqs)
        still = []
        for item in running:
            item[1] += 1
            if item[1] >= item[0].output:
                for s in item[2]:
                    space.release(s, item[3])
            else:
                still.append(item)
        running = still
    return tally.summary(capacity)


def _blocks(tokens: int, block: int) -> int:
    return -(-tokens // block)


def simulate_paged(reqs: list[Req], capacity: int, block: int, shared_prefix: int) -> dict[str, Any]:
    """Blocks as sequences grow. Each step: if the running sequences' next tokens need more blocks than exist,
    preempt the latest-admitted request (back to the head of the queue, recomputed later, as vLLM does); then
    admit waiting requests in order while their first step fits."""
    total_blocks = capacity // block
    prefix_blocks = shared_prefix // block  # full blocks of the common prefix: one cached copy for everyone
    queue, running, tally, preemptions = list(reqs), [], Tally(), 0

    def own_full(r: Req) -> int:  # the request's full prompt blocks past the shared prefix; its samples share them
        return max(r.prompt // block - prefix_blocks, 0)

    def held(r: Req, t: int) -> int:  # blocks while the sequences hold prompt + t tokens
        return own_full(r) + r.n * (_blocks(r.prompt + t, block) - r.prompt // block)

    def stored(r: Req, t: int) -> int:  # token slots holding a token (the partial prompt block is per sample)
        return own_full(r) * block + r.n * (r.prompt % block + t)

    while queue or running:
        while running and prefix_blocks + sum(held(r, t + 1) for r, t in running) > total_blocks:
            victim = running.pop()
            queue.insert(0, victim[0])
            preemptions += 1
        need = prefix_blocks + sum(held(r, t + 1) for r, t in running)
        while queue and need + held(queue[0], 1) <= total_blocks:
            need += held(queue[0], 1)
            running.append([queue.pop(0), 0])
        if not running:
            raise ValueError(f"a request needs {held(queue[0], 1)} blocks; the cache holds {total_blocks}")
        tally.steps += 1
        used = prefix_blocks * block + sum(stored(r, t + 1) for r, t in running)
        tally.used += used
        tally.internal += need * block - used
        seqs = sum(r.n for r, _ in running)
        tally.running += seqs
        tally.peak_running = max(tally.peak_running, seqs)
        still = []
        for item in running:
            item[1] += 1
            if item[1] < item[0].output:
                still.append(item)
        running = still
    tally.extra["preemptions"] = preemptions
    return tally.summary(total_blocks * block)


def load_requests(args: argparse.Namespace) -> list[Req]:
    rng = random.Random(args.seed)
    if args.dataset:
        from transformers import AutoTokenizer

        from tokenmill.bench.datasets import sharegpt_dataset

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        picked = sharegpt_dataset(args.dataset, args.num_requests, tokenizer=tokenizer, seed=args.seed,
                                  max_prompt_len=args.max_model_len - 1, max_total_len=args.max_model_len)
        return [Req(len(p.prompt_token_ids), p.output_len, args.n) for p in picked]
    lo_in, hi_in = (int(v) for v in args.input_len_range.split(":"))
    lo_out, hi_out = (int(v) for v in args.output_len_range.split(":"))
    return [Req(rng.randint(lo_in, hi_in), rng.randint(lo_out, hi_out), args.n) for _ in range(args.num_requests)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b", help="model shape for bytes per token")
    parser.add_argument("--kv-gib", type=float, default=20.0, help="KV memory for both allocators")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="auto: bf16")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--reserve", default="max_model_len", choices=["max_model_len", "request"])
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--input-len-range", default="4:1024")
    parser.add_argument("--output-len-range", default="4:1024")
    parser.add_argument("--dataset", default=None, help="ShareGPT-format JSON (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--n", type=int, default=1, help="samples per request")
    parser.add_argument("--shared-prefix", type=int, default=0, help="tokens of a common prefix (prefix caching)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from tokenmill.bench.roofline import kv_bytes_per_token
    from tokenmill.model.presets import preset_spec

    bytes_per_token = kv_bytes_per_token(preset_spec(args.preset), 1 if args.kv_cache_dtype == "fp8" else 2)
    capacity = int(args.kv_gib * 2**30 // bytes_per_token)
    reqs = load_requests(args)
    contiguous = simulate_contiguous(reqs, capacity, args.max_model_len, args.reserve)
    paged = simulate_paged(reqs, capacity, args.block_size, args.shared_prefix)
    result = {"preset": args.preset, "kv_gib": args.kv_gib, "kv_cache_dtype": args.kv_cache_dtype,
              "bytes_per_token": bytes_per_token, "capacity_tokens": capacity, "requests": len(reqs), "n": args.n,
              "mean_prompt": sum(r.prompt for r in reqs) / len(reqs),
              "mean_output": sum(r.output for r in reqs) / len(reqs), "reserve": args.reserve,
              "contiguous": contiguous, "paged": paged,
              "batch_ratio_paged_over_contiguous": paged["mean_running_seqs"] / contiguous["mean_running_seqs"],
              "steps_ratio_contiguous_over_paged": contiguous["steps"] / paged["steps"]}
    print(f"{len(reqs)} requests, {capacity:,} KV tokens ({args.kv_gib} GiB, {args.kv_cache_dtype}), "
          f"reserve {args.reserve}")
    print("| allocator | mean batch | steps | used | internal waste | external waste |\n|---|---|---|---|---|---|")
    for name, r in (("contiguous", contiguous), ("paged", paged)):
        print(f"| {name} | {r['mean_running_seqs']:.1f} | {r['steps']} | {r['used_pct']:.1f}% | "
              f"{r['internal_waste_pct']:.1f}% | {r['external_waste_pct']:.1f}% |")
    if args.out:
        from gpu_record import write_record

        write_record(Path(args.out), "kv_memory", device="none (simulation)", **result)
    return result


if __name__ == "__main__":
    print(json.dumps(main()["paged"], indent=None))
