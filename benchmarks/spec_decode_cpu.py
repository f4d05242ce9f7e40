"""Speculative decoding on CPU with the embedded SmolLM2-135M-Instruct: n-gram (prompt lookup) acceptance and
batch-1 end-to-end speedup on three prompt kinds — quote a given passage, edit given code, free chat.

Each prompt runs plain and speculative greedy decoding back to back, ``--rounds`` times with the order alternating
(same engine settings; the box's load hits both alike), and the outputs must be token-identical. Reports the
acceptance rate (accepted / proposed drafts), the mean acceptance length (tokens per verification step), the speedup
of output tokens per second (total time, and the median of the per-pair time ratios, which a load burst moves
less), the box's load average, and the step costs the adaptive policy measured (query tokens -> median ms; the
speculative engine lives across kinds, as a server's would); JSON with date, device and the exact command.

    PYTHONPATH=. python3 benchmarks/spec_decode_cpu.py --rounds 3 --out benchmarks/results/spec_decode_cpu.json
    PYTHONPATH=. python3 benchmarks/spec_decode_cpu.py --kinds chat --rounds 3 --batch   # also all prompts at once
    PYTHONPATH=. python3 benchmarks/spec_decode_cpu.py --draft-model DIR   # also a draft model (distilled)
    # the draft proposing from its 4k / 8k most frequent ids and from the whole vocabulary (draft_vocab.json)
    PYTHONPATH=. python3 benchmarks/spec_decode_cpu.py --kinds chat --draft-model DIR --draft-vocab-sizes 4096,8192,full
    # an EAGLE head (benchmarks/eagle_cpu.py trains one; its own draft_vocab_size), k = 4 every step
    PYTHONPATH=. python3 benchmarks/spec_decode_cpu.py --kinds chat --no-ngram --eagle DIR --no-adaptive --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_record import write_record  # noqa: E402  (sibling benchmark module: the common JSON header)

from tokenmill import SamplingParams  # noqa: E402
from tokenmill.engine.llm import LLM  # noqa: E402

PASSAGE_FILE = Path(__file__).resolve().parents[1] / "tokenmill" / "quantization" / "data" / "kjv_heldout.txt"
CODE = '''def summarize(values):
    total = 0
    count = 0
    for value in values:
        if value is None:
            continue
        total += value
        count += 1
    if count == 0:
        return 0.0
    return total / count
'''


def prompts(passage_chars: int) -> dict[str, list[str]]:
    text = " ".join(PASSAGE_FILE.read_text().split())
    passages = [text[i : i + passage_chars] for i in (0, 5000, 10000)]
    return {
        "quote": [f"Here is a passage:\n\n{p}\n\nRepeat the passage above word for word." for p in passages],
        "code": [f"Here is a Python function:\n\n{CODE}\nRename the variable `total` to `running_sum` and show the "
                 "whole function.", f"{CODE}\nAdd a docstring to this function and show the whole function.",
                 f"{CODE}\nRewrite this function with type hints and show the whole function."],
        "chat": ["Write a short story about a lighthouse keeper.", "What are three tips for learning to cook?",
                 "Explain why the sky is blue to a child."],
    }


def timed_chat(llm: LLM, message: str | list[str], params: SamplingParams) -> tuple[float, list[int]]:
    """Seconds to answer ``message`` (a list: all at once, one batch) and the output ids (concatenated)."""
    messages = [message] if isinstance(message, str) else message
    start = time.perf_counter()
    outputs = llm.chat([[{"role": "user", "content": m}] for m in messages], params, use_tqdm=False)
    return time.perf_counter() - start, [t for output in outputs for t in output.outputs[0].token_ids]


class ProposeTimer:
    """Wall time inside a draft model's ``propose_many`` and the drafts it returned (its cost per draft token)."""

    def __init__(self, llm: LLM) -> None:
        self.seconds, self.calls, self.drafts = 0.0, 0, 0
        proposer = getattr(llm.engine.scheduler.draft_proposer, "proposer", None)
        if proposer is not None and hasattr(proposer, "propose_many"):
            inner = proposer.propose_many

            def timed(requests, k):
                started = time.perf_counter()
                out = inner(requests, k)
                self.seconds += time.perf_counter() - started
                self.calls += 1
                self.drafts += sum(len(d) for d in out.values())
                return out

            proposer.propose_many = timed

    def summary(self) -> dict[str, float]:
        if not self.calls:
            return {}
        return {"draft_calls": self.calls, "draft_ms_per_call": round(self.seconds / self.calls * 1e3, 2),
                "draft_ms_per_draft_token": round(self.seconds / max(1, self.drafts) * 1e3, 2)}


def run_kind(plain: LLM, spec: LLM, messages: list[str] | list[list[str]], params: SamplingParams,
             rounds: int) -> dict[str, Any]:
    stats = spec.engine.spec_decode_stats
    timer = ProposeTimer(spec)
    before = stats.copy()
    plain_s = spec_s = 0.0
    tokens = 0
    identical = True
    ratios = []  # plain / speculative seconds of each back-to-back pair
    for r in range(rounds):
        for i, message in enumerate(messages):
            if (r + i) % 2 == 0:
                t_plain, ids_plain = timed_chat(plain, message, params)
                t_spec, ids_spec = timed_chat(spec, message, params)
            else:
                t_spec, ids_spec = timed_chat(spec, message, params)
                t_plain, ids_plain = timed_chat(plain, message, params)
            plain_s, spec_s, tokens = plain_s + t_plain, spec_s + t_spec, tokens + len(ids_plain)
            identical &= ids_plain == ids_spec
            ratios.append(t_plain / t_spec)
    window = stats.since(before)
    return {"prompts": len(messages), "rounds": rounds, "output_tokens": tokens,
            "plain_tok_s": round(tokens / plain_s, 2), "spec_tok_s": round(tokens / spec_s, 2),
            "speedup": round(plain_s / spec_s, 3), "median_pair_speedup": round(statistics.median(ratios), 3),
            "pair_speedups": [round(x, 3) for x in ratios], "token_identical": identical, **window.summary(),
            **timer.summary()}


def cpu_device(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def load_averages(before: tuple[float, float, float]) -> dict[str, list[float]]:
    """The box's 1/5/15-minute load averages at the start (``before``) and now, printed and returned."""
    load = {"before": [round(x, 2) for x in before], "after": [round(x, 2) for x in os.getloadavg()]}
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    return load


def measured_costs(llm: LLM) -> list[tuple[int, float]]:
    """The adaptive policy's measured step costs: (query tokens, median ms) per known size."""
    policy = llm.engine.scheduler.draft_proposer.policy
    return [(n, round(seconds * 1e3, 2)) for n, seconds in policy.step_cost.points()]


@torch.no_grad()
def linear_row_costs(llm: LLM, rows: list[int], repeats: int = 25) -> dict[int, dict[str, float]]:
    """Median ms of the target's linear layers (all decoder layers, one pass) and of its output head on ``rows``
    query tokens, the sizes interleaved so load hits them alike: what a (1 + k)-token verification step pays in
    matmuls against a plain step's one row."""
    from tokenmill.model.linear import LinearBase

    model = llm.engine.model
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    inputs = {n: {m.input_size: torch.randn(n, m.input_size) for m in linears} for n in rows}
    hidden = {n: torch.randn(n, linears[0].input_size) for n in rows}
    times: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in rows}
    for _ in range(repeats):
        for n in rows:
            started = time.perf_counter()
            for m in linears:
                m(inputs[n][m.input_size])
            mid = time.perf_counter()
            model.compute_logits(hidden[n])
            times[n][0].append(mid - started)
            times[n][1].append(time.perf_counter() - mid)
    return {n: {"linears_ms": round(statistics.median(a) * 1e3, 2), "head_ms": round(statistics.median(b) * 1e3, 2)}
            for n, (a, b) in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--passage-chars", type=int, default=600)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=1)
    parser.add_argument("--draft-model", default=None, help="also measure a draft model (same tokenizer)")
    parser.add_argument("--draft-dtype", default=None, help="the draft model's dtype (default: the target's, float32)")
    parser.add_argument("--draft-vocab-sizes", default=None,
                        help="comma list of N (or 'full'): the draft proposes from its N most frequent ids, one run "
                             "each (default: the draft directory's own draft_vocab_size, if any)")
    parser.add_argument("--eagle", default=None, help="also measure an EAGLE head directory (method eagle)")
    parser.add_argument("--no-ngram", action="store_true", help="measure only the draft model / EAGLE head")
    parser.add_argument("--kinds", default="quote,code,chat")
    parser.add_argument("--prompts-per-kind", type=int, default=3)
    parser.add_argument("--chat-prompts-file", default=None,
                        help="chat prompts from this file instead (one a line), with --chat-prompt-lines")
    parser.add_argument("--chat-prompt-lines", default=None,
                        help="A:B, the file's lines A..B-1 (0-based), e.g. 1193:1326: gpu_eagle.py's held-out prompts")
    parser.add_argument("--rounds", type=int, default=1, help="each prompt's plain/speculative pair, order alternating")
    parser.add_argument("--no-adaptive", action="store_true", help="draft k tokens every step (the policy off)")
    parser.add_argument("--batch", action="store_true",
                        help="also run every kind's prompts at once (one batch: the mixed load of a busy server)")
    parser.add_argument("--linear-rows", default=None,
                        help="comma list of query-token counts: also time the target's linear layers and head at "
                             "each (what a 1 + k token verification step pays in matmuls)")
    parser.add_argument("--device", default="cpu", help="cuda: the same measurement on a GPU (gpu_jobs.sh eagle)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    engine_args = dict(dtype="float32", max_model_len=2048, max_num_seqs=1, device=args.device)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    plain = LLM(None, **engine_args)
    methods = {} if args.no_ngram else {
        "ngram": {"method": "ngram", "num_speculative_tokens": args.k, "adaptive": not args.no_adaptive,
                  "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}}
    if args.draft_model:
        draft = {"method": "draft_model", "model": args.draft_model, "num_speculative_tokens": args.k,
                 "adaptive": not args.no_adaptive, "draft_dtype": args.draft_dtype}
        if args.draft_vocab_sizes is None:
            methods["draft_model"] = draft
        for size in (args.draft_vocab_sizes or "").split(",") if args.draft_vocab_sizes else []:
            full = size == "full"
            methods[f"draft_model_vocab_{size}"] = {
                **draft, "draft_vocab_size": plain.engine.model.vocab_size if full else int(size)}
    if args.eagle:
        methods["eagle"] = {"method": "eagle", "model": args.eagle, "num_speculative_tokens": args.k,
                            "adaptive": not args.no_adaptive}
    load_before = os.getloadavg()
    row_costs = {}
    if args.linear_rows:
        row_costs = linear_row_costs(plain, [int(n) for n in args.linear_rows.split(",")])
        for n, row in row_costs.items():
            print(f"target matmuls, {n} query tokens: linears {row['linears_ms']:.1f} ms, head {row['head_ms']:.1f} ms")
    costs: dict[str, list[tuple[int, float]]] = {}
    all_prompts = prompts(args.passage_chars)
    if args.chat_prompts_file:  # e.g. the EAGLE head's held-out prompts: a larger chat set than the three above
        lines = Path(args.chat_prompts_file).read_text().splitlines()
        first, last = (int(x) for x in (args.chat_prompt_lines or f"0:{len(lines)}").split(":"))
        all_prompts["chat"] = [line for line in lines[first:last] if line.strip()]
        if not all_prompts["chat"]:
            raise SystemExit(f"no prompts in lines {first}:{last} of {args.chat_prompts_file}")
    results: dict[str, dict[str, Any]] = {}
    warm = SamplingParams(temperature=0.0, max_tokens=4)
    timed_chat(plain, "Hello!", warm)  # first-call costs (allocator, caches) stay out of the timed runs
    for method, config in methods.items():
        spec = LLM(None, **engine_args, speculative_config=config)
        timed_chat(spec, "Hello!", warm)
        for kind in args.kinds.split(","):
            row = run_kind(plain, spec, all_prompts[kind][: args.prompts_per_kind], params, args.rounds)
            results.setdefault(method, {})[kind] = row
            print(f"{method:11s} {kind:5s}: acceptance {row['acceptance_rate']:.3f}, mean acceptance length "
                  f"{row['mean_acceptance_length']:.2f}, {row['plain_tok_s']:6.2f} -> {row['spec_tok_s']:6.2f} tok/s "
                  f"({row['speedup']:.2f}x, median pair {row['median_pair_speedup']:.2f}x), "
                  f"identical {row['token_identical']}"
                  + (f", draft {row['draft_ms_per_draft_token']:.1f} ms/token" if "draft_calls" in row else ""),
                  flush=True)
        costs[method] = measured_costs(spec)
        print(f"{method:11s} measured step costs (query tokens, ms): {costs[method]}", flush=True)
        if args.batch:  # fresh engines that admit the whole mix at once (the policy learns its costs anew)
            mix = [m for kind in args.kinds.split(",") for m in all_prompts[kind][: args.prompts_per_kind]]
            batch_args = {**engine_args, "max_num_seqs": len(mix)}
            plain_batch, spec_batch = LLM(None, **batch_args), LLM(None, **batch_args, speculative_config=config)
            timed_chat(plain_batch, ["Hello!"] * len(mix), warm)
            timed_chat(spec_batch, ["Hello!"] * len(mix), warm)
            row = run_kind(plain_batch, spec_batch, [mix], params, args.rounds)
            results[method][f"batch{len(mix)}"] = row
            print(f"{method:11s} batch of {len(mix)} (every kind at once): acceptance {row['acceptance_rate']:.3f}, "
                  f"{row['plain_tok_s']:6.2f} -> {row['spec_tok_s']:6.2f} tok/s ({row['speedup']:.2f}x, median pair "
                  f"{row['median_pair_speedup']:.2f}x), identical {row['token_identical']}", flush=True)
            costs[f"{method}_batch"] = measured_costs(spec_batch)
            print(f"{method:11s} batch measured step costs (query tokens, ms): {costs[f'{method}_batch']}", flush=True)
        del spec
        gc.collect()  # one speculative engine (target + draft) in memory at a time
    load = load_averages(load_before)
    if args.out:
        path = write_record(
            Path(args.out), "spec_decode_cpu", model=plain.engine.model_name, config=vars(args), results=results,
            device=cpu_device(args.device), load_average=load, measured_step_ms=costs, linear_row_costs=row_costs,
            median_speedup={m: statistics.median(r["speedup"] for r in rows.values()) for m, rows in results.items()})
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
