"""``tokenmill bench kv-memory``: paged vs contiguous KV allocation for the same KV memory (the memory story).

Requests (random length ranges or a ShareGPT-format file) queue at once and run to completion: each step admits
waiting requests in order while memory allows, then every running sequence decodes one token. Two allocators:
- contiguous: each request reserves, up front and in one piece (first fit in one address space), either
  ``max_model_len`` tokens or its own prompt + max_tokens (``--reserve``), per sample (``n``);
- paged: blocks of ``--block-size`` tokens taken as the sequence grows (no reservation); ``n`` samples share
  their prompt's full blocks, and with ``--shared-prefix`` every request's first S tokens are one cached copy.
Per allocator it reports the steady batch (mean running sequences), steps to finish (a throughput proxy: steps
are what a GPU pays for), and the time-averaged split of memory into used, internal waste (reserved or
block tails not holding tokens) and external waste (free memory the head-of-line request could not use).

``--engine`` then runs the real engine on the same requests twice with the same KV blocks: paged, and with
``--kv-reservation`` (each request's whole KV reserved at admission, as a contiguous allocator must), and reports
the measured output tokens/s, mean batch and preemptions of each (the simulation then uses the engine's KV size).

    tokenmill bench kv-memory --preset llama3-8b --kv-gib 20 --input-len-range 4:1024 --output-len-range 4:1024
    tokenmill bench kv-memory --dataset ShareGPT_V3.json --tokenizer DIR --output-json kv_memory.json --plot kv.png
    tokenmill bench kv-memory --engine --random-weights llama3-8b --num-requests 1000 --input-len-range 4:1024 ...
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import random
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
            per_seq = max_model_len if reserve == "max-model-len" else r.prompt + r.output
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

        if not args.tokenizer:
            raise ValueError("--dataset needs --tokenizer (the lengths are counted in its tokens)")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        picked = sharegpt_dataset(args.dataset, args.num_requests, tokenizer=tokenizer, seed=args.seed,
                                  max_prompt_len=args.max_model_len - 1, max_total_len=args.max_model_len)
        return [Req(len(p.prompt_token_ids), p.output_len, args.n) for p in picked]
    from tokenmill.bench.workloads import parse_range

    lo_in, hi_in = parse_range(args.input_len_range, "--input-len-range")
    lo_out, hi_out = parse_range(args.output_len_range, "--output-len-range")
    return [Req(rng.randint(lo_in, hi_in), rng.randint(lo_out, hi_out), args.n) for _ in range(args.num_requests)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from tokenmill.engine.cli import add_engine_arguments

    w = parser.add_argument_group("requests and memory")
    w.add_argument("--preset", default="llama3-8b", help="model shape for KV bytes per token (simulation only)")
    w.add_argument("--kv-gib", type=float, default=20.0, help="KV memory for both allocators (simulation only)")
    w.add_argument("--reserve", default="max-model-len", choices=["max-model-len", "request"],
                   help="what a contiguous allocator reserves per sequence")
    w.add_argument("--num-requests", type=int, default=1000)
    w.add_argument("--input-len-range", default="4:1024", help="LOW:HIGH prompt tokens, uniform")
    w.add_argument("--output-len-range", default="4:1024", help="LOW:HIGH output tokens, uniform")
    w.add_argument("--dataset", default=None, help="ShareGPT-format JSON (needs --tokenizer)")
    w.add_argument("--tokenizer", default=None)
    w.add_argument("--n", type=int, default=1, help="samples per request")
    w.add_argument("--shared-prefix", type=int, default=0, help="tokens of a common prefix (prefix caching)")
    o = parser.add_argument_group("output")
    o.add_argument("--output-json", default=None, metavar="PATH")
    o.add_argument("--plot", default=None, metavar="PNG", help="memory split and batch of both allocators")
    e = parser.add_argument_group("engine run (--engine)")
    e.add_argument("--engine", action="store_true",
                   help="also run the engine both ways on these requests (needs --model or --random-weights)")
    add_engine_arguments(e, model_flag=True)


def simulate(reqs: list[Req], capacity: int, args: argparse.Namespace) -> dict[str, Any]:
    contiguous = simulate_contiguous(reqs, capacity, args.max_model_len, args.reserve)
    paged = simulate_paged(reqs, capacity, args.block_size, args.shared_prefix)
    return {"capacity_tokens": capacity, "requests": len(reqs), "n": args.n,
            "mean_prompt": sum(r.prompt for r in reqs) / len(reqs),
            "mean_output": sum(r.output for r in reqs) / len(reqs), "reserve": args.reserve,
            "contiguous": contiguous, "paged": paged,
            "batch_ratio_paged_over_contiguous": paged["mean_running_seqs"] / contiguous["mean_running_seqs"],
            "steps_ratio_contiguous_over_paged": contiguous["steps"] / paged["steps"]}


def run_engine_both_ways(engine: Any, reqs: list[Req], reserve: str, seed: int) -> dict[str, Any]:
    """The same requests through one engine, paged and then reserving whole requests (same KV blocks)."""
    import numpy as np

    from tokenmill.bench.throughput import run_offline, warm_up
    from tokenmill.bench.workloads import OfflineRequest, random_token_ids

    rng = np.random.default_rng(seed)
    vocab = engine.model.spec.vocab_size
    offline = [OfflineRequest(random_token_ids(rng, r.prompt, vocab), r.output) for r in reqs]
    warm_up(engine, 4, vocab)
    runs = {}
    for mode in ("none", reserve):
        engine.scheduler.kv_reservation = mode
        before = engine.scheduler.num_preemptions
        result = run_offline(engine, offline, ignore_eos=True, temperature=1.0, id_prefix=f"{mode}-")
        rows = [len(shape.new) for shape in result.steps]
        runs["paged" if mode == "none" else "reserved"] = {
            "kv_reservation": mode, "output_tok_s": result.output_tok_s, "elapsed_s": result.elapsed_s,
            "steps": len(result.steps), "mean_running_seqs": sum(rows) / max(len(rows), 1),
            "peak_running_seqs": max(rows, default=0), "preemptions": engine.scheduler.num_preemptions - before}
    engine.scheduler.kv_reservation = "none"
    runs["throughput_ratio_paged_over_reserved"] = runs["paged"]["output_tok_s"] / runs["reserved"]["output_tok_s"]
    return runs


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['requests']} requests, {result['capacity_tokens']:,} KV tokens, contiguous reserves "
          f"{result['reserve']}")
    print("| allocator | mean batch | steps | used | internal waste | external waste |\n|---|---|---|---|---|---|")
    for name in ("contiguous", "paged"):
        r = result[name]
        print(f"| {name} (simulated) | {r['mean_running_seqs']:.1f} | {r['steps']} | {r['used_pct']:.1f}% | "
              f"{r['internal_waste_pct']:.1f}% | {r['external_waste_pct']:.1f}% |")
    engine = result.get("engine")
    if engine:
        print("\n| engine run | output tok/s | mean batch | peak batch | steps | preemptions |\n|---|---|---|---|---|---|")
        for name in ("paged", "reserved"):
            r = engine[name]
            print(f"| {name} ({r['kv_reservation']}) | {r['output_tok_s']:,.1f} | {r['mean_running_seqs']:.1f} | "
                  f"{r['peak_running_seqs']} | {r['steps']} | {r['preemptions']} |")
        print(f"paged / reserved throughput: {engine['throughput_ratio_paged_over_reserved']:.2f}x")


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("contiguous", "paged")
    parts = (("used_pct", "holding tokens"), ("internal_waste_pct", "internal waste"),
             ("external_waste_pct", "external waste"))
    fig, (memory, batch) = plt.subplots(1, 2, figsize=(10, 4))
    bottom = [0.0, 0.0]
    for key, label in parts:
        values = [result[n][key] for n in names]
        memory.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    memory.set_ylabel("% of KV memory (time-averaged)")
    memory.legend()
    batch.bar(names, [result[n]["mean_running_seqs"] for n in names])
    batch.set_ylabel("mean running sequences")
    fig.suptitle(f"{result['requests']} requests, {result['capacity_tokens']:,} KV tokens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bench kv-memory`` (bench/cli.py turns a ValueError into one line and exit status 2)."""
    engine = None
    if args.engine:
        from tokenmill.bench.throughput import engine_kwargs_from
        from tokenmill.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_kwargs(stream_outputs=False, **engine_kwargs_from(args))
        args.max_model_len = engine.max_model_len
        capacity, bytes_per_token, source = engine.num_kv_cache_tokens, None, "engine"
    else:
        from tokenmill.bench.roofline import kv_bytes_per_token
        from tokenmill.model.presets import preset_spec

        if args.max_model_len is None:
            args.max_model_len = 4096
        bytes_per_token = kv_bytes_per_token(preset_spec(args.preset), 1 if args.kv_cache_dtype.startswith("fp8") else 2)
        capacity, source = int(args.kv_gib * 2**30 // bytes_per_token), f"{args.preset} in {args.kv_gib} GiB"
    reqs = load_requests(args)
    too_long = [r for r in reqs if r.prompt + r.output > args.max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} requests exceed --max-model-len {args.max_model_len} (prompt + output); "
                         "shorten the length ranges or raise it")
    result = {"kv_source": source, "bytes_per_token": bytes_per_token, "max_model_len": args.max_model_len,
              **simulate(reqs, capacity, args)}
    if engine is not None:
        result["engine"] = run_engine_both_ways(engine, reqs, "max-model-len" if args.reserve == "max-model-len"
                                                else "request", args.seed)
    print_table(result)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.output_json:
        from tokenmill.bench.throughput import device_name

        record = {"benchmark": "kv_memory", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                  "device": device_name(engine.config.model.device) if engine else "none (simulation)",
                  "command": shlex.join(sys.argv), **result}
        path = Path(args.output_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
