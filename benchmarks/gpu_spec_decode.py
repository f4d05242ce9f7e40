"""Speculative decoding on one GPU, Llama-3-8B shape (random weights): what verification costs and what it buys.

1. Verification cost: the runner's step (inputs, CUDA graph replay or eager, sampling, acceptance on the host) with
   k = 1..8 draft tokens per row vs a plain decode step, at batch 1..256 and a fixed context; so the speedup for any
   acceptance rate a follows as E(a, k) / (t_k / t_0), E = 1 + a + ... + a^k.
2. End to end with an oracle proposer that proposes the target's own greedy continuation (every draft accepted:
   the mechanism's ceiling) at k = 4, batches 1 / 16 / 64: output tokens per second vs plain decoding. In bf16 that
   continuation depends on the step's shape, so the oracle iterates to a fixed point (see ``oracle_runs``) and the
   rows record where speculative output first left the plain one.
3. The adaptive policy (oracle proposals, policy free to pick k or none; its step costs measured from the engine's
   own steps, the 128-token ridge as their prior; its gate choosing overlapped plain or synchronous speculative
   steps by measured throughput) vs plain decoding at batch 1 (it should keep the oracle's speedup) and 256 (within
   3% of plain: alternating runs, medians; one decoder for all rounds, as an engine keeps one); the oracle is the
   fixed point of part 2 (at 256 in bf16 it does not converge: rows diverge, the adversarial case for the policy).
4. A draft model's proposal cost (``--draft-preset``, random weights: cost only, its drafts mean nothing): ms per
   ``propose_many`` call of k drafts for batches 1..64, its one-token steps on CUDA graphs vs eager, same call.

    python3 benchmarks/gpu_spec_decode.py --out $OUT/gpu_spec_decode.json     # H100, ~5 min
    python3 benchmarks/gpu_spec_decode.py --preset tiny-llama --device cpu --quick --out /tmp/spec.json  # CPU check
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_record import write_record  # noqa: E402  (sibling benchmark module)

from tokenmill.engine.core_loop_stats import CoreLoopStats  # noqa: E402
from tokenmill.engine.gc_heap import CollectionTimer, freeze_startup_heap  # noqa: E402
from tokenmill.engine.llm_engine import LLMEngine  # noqa: E402
from tokenmill.engine.step_record import NewRequest, ScheduledRequest, StepRecord  # noqa: E402
from tokenmill.intmath import cdiv  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402
from tokenmill.spec_decode.decoder import DraftRequest, SpeculativeDecoder  # noqa: E402
from tokenmill.spec_decode.policy import AdaptivePolicy  # noqa: E402
from tokenmill.spec_decode.step_cost import measured_step_cost  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- 1. verification step cost ---------------------------------------------------------------------
def step_cost(engine: LLMEngine, batch: int, k: int, context: int, repeats: int, tag: str) -> float:
    """Median ms of a runner step of ``batch`` rows, each 1 + k query tokens after ``context`` cached positions
    (the cache holds whatever was there: timing only). The request's state is dropped afterwards."""
    runner, block = engine.runner, engine.config.cache.block_size
    blocks_per_seq = cdiv(context + k + 1, block)
    ids = [f"{tag}{i}" for i in range(batch)]
    generator = torch.Generator().manual_seed(batch * 16 + k)
    known = torch.randint(0, engine.model.vocab_size, (context + 1,), generator=generator).tolist()
    drafts = torch.randint(0, engine.model.vocab_size, (k,), generator=generator).tolist()

    def record(first: bool) -> StepRecord:
        scheduled = [ScheduledRequest(rid, 1 + k, context, known if first else [],
                                      list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) if first else [],
                                      blocks_per_seq, list(drafts), True) for i, rid in enumerate(ids)]
        new = [NewRequest(rid, GREEDY, None, context + 1) for rid in ids] if first else []
        return StepRecord(scheduled, new)

    runner.launch(record(first=True)).result()
    steady = record(first=False)
    for _ in range(3):
        runner.launch(steady).result()
    times = []
    for _ in range(repeats):
        sync(engine.config.model.device)
        start = time.perf_counter()
        runner.launch(steady).result()  # the host reads the ids: a speculating engine waits for every step
        times.append((time.perf_counter() - start) * 1e3)
    runner.batch.update(StepRecord(finished_req_ids=ids))
    return statistics.median(times)


def verification_costs(engine: LLMEngine, batches: list[int], ks: list[int], context: int,
                       repeats: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batches:
        base = step_cost(engine, batch, 0, context, repeats, f"b{batch}k0-")
        row = {"batch": batch, "plain_ms": round(base, 3), "verify_ms": {}, "ratio": {}}
        for k in ks:
            ms = step_cost(engine, batch, k, context, repeats, f"b{batch}k{k}-")
            row["verify_ms"][k], row["ratio"][k] = round(ms, 3), round(ms / base, 3)
        rows.append(row)
        print(f"batch {batch:4d}: plain {base:8.2f} ms | " + " ".join(
            f"k={k}: {row['ratio'][k]:.2f}x" for k in ks), flush=True)
    return rows


# ---- 2./3. end to end with an oracle proposer ------------------------------------------------------------
class OracleProposer:
    """Proposes the target's own greedy continuation of each prompt (known from a plain run)."""

    def __init__(self) -> None:
        self.reference: dict[tuple[int, ...], list[int]] = {}  # prompt -> prompt + greedy output

    def propose_many(self, requests: list[DraftRequest], k: int) -> dict[str, list[int]]:
        out = {}
        for r in requests:
            full = self._full(r.token_ids)
            if full is not None:
                out[r.seq_id] = full[len(r.token_ids) : len(r.token_ids) + min(k, r.max_num_tokens)]
        return out

    def _full(self, token_ids: list[int]) -> list[int] | None:
        for prompt_len in self.lengths:
            full = self.reference.get(tuple(token_ids[:prompt_len]))
            if full is not None:
                return full
        return None

    @property
    def lengths(self) -> set[int]:
        return {len(p) for p in self.reference}

    def release(self, seq_id: str) -> None:
        pass


def generate(engine: LLMEngine, prompts: list[list[int]], output_len: int, tag: str,
             steps: CoreLoopStats | None = None, collections: list[float] | None = None
             ) -> tuple[float, list[list[int]]]:
    """Seconds to generate ``output_len`` tokens for every prompt (all added at once), and the outputs; with
    ``steps``, each step() call's wall time by the kind of step it launched (as the served engine core logs it);
    with ``collections``, the ms of each full garbage collection that ran inside the timed loop."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, params)
    gc.collect()  # every timed run starts from the same collector state (not a previous run's garbage)
    sync(engine.config.model.device)
    with CollectionTimer() as timer:
        start = time.perf_counter()
        outputs = step_until_done(engine, steps)
        sync(engine.config.model.device)
        seconds = time.perf_counter() - start
    if collections is not None:
        collections += timer.pauses_ms
    return seconds, [outputs[f"{tag}{i}"] for i in range(len(prompts))]


def step_until_done(engine: LLMEngine, steps: CoreLoopStats | None) -> dict[str, list[int]]:
    """Step the engine until every request finished; request id -> output ids."""
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished_requests() or engine.in_flight is not None:
        t0 = time.perf_counter()
        landed = engine.step()
        if steps is not None:
            seconds = time.perf_counter() - t0
            steps.loop_seconds["step"] += seconds
            steps.record_step(seconds, engine.in_flight)
            timeline = getattr(steps, "timeline", None)
            if timeline is not None:  # per step: ms, rows, query tokens, whether it waited for the previous ids
                launched = engine.in_flight
                timeline.append((round(seconds * 1e3, 3), len(launched.sched.scheduled) if launched else 0,
                                 launched.sched.num_tokens if launched else 0,
                                 launched.synchronous if launched else None))
        for out in landed:
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    return outputs


def step_split(steps: CoreLoopStats) -> dict[str, float]:
    """Where a run's wall time went: step() seconds and counts by the kind of step launched (prompt / decode; only
    with async scheduling, where a step stays in flight), and all step() calls (a synchronous engine: only these)."""
    out = {f"{kind}_steps": len(times) for kind, times in steps.step_seconds.items()}
    out.update({f"{kind}_s": round(sum(times), 4) for kind, times in steps.step_seconds.items()})
    out["calls"], out["calls_s"] = steps.num_steps, round(steps.loop_seconds["step"], 4)
    return out


def timeline_diff(timelines: dict[str, list[tuple]]) -> dict[str, Any]:
    """Where the adaptive round's extra time sits: step counts, synchronous steps, and the steps (by index) whose
    step() time differs most between the two modes' last rounds."""
    plain, adaptive = timelines["plain"], timelines["adaptive"]
    pairs = [(i, a[0] - p[0], p, a) for i, (p, a) in enumerate(zip(plain, adaptive, strict=False))]
    pairs.sort(key=lambda x: -abs(x[1]))
    return {"steps": [len(plain), len(adaptive)],
            "synchronous_steps": [sum(1 for s in t if s[3]) for t in (plain, adaptive)],
            "total_ms": [round(sum(s[0] for s in t), 2) for t in (plain, adaptive)],
            "largest_differences": [{"index": i, "delta_ms": round(d, 3), "plain": p, "adaptive": a}
                                    for i, d, p, a in pairs[:12]]}


def make_decoder(oracle: OracleProposer, k: int, adaptive: bool, device: str) -> SpeculativeDecoder:
    policy = AdaptivePolicy(k, measured_step_cost(device), adaptive=adaptive)  # as the engine builds it
    return SpeculativeDecoder(oracle, policy, pad_to_uniform=True)


def run_case(engine: LLMEngine, proposer: Any, prompts: list[list[int]], output_len: int, tag: str,
             steps: CoreLoopStats | None = None, collections: list[float] | None = None):
    engine.scheduler.draft_proposer = proposer
    engine.runner.draft_probs = None
    return generate(engine, prompts, output_len, tag, steps, collections)


def oracle_runs(engine: LLMEngine, batches: list[int], k: int, prompt_len: int, output_len: int,
                max_passes: int = 4) -> list[dict]:
    rows, vocab = [], engine.model.vocab_size
    for batch in batches:
        generator = torch.Generator().manual_seed(1000 + batch)
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(batch)]
        oracle = OracleProposer()
        run_case(engine, None, prompts, 4, f"warm{batch}-")  # allocator and graphs warm at this batch
        plain_s, outputs = run_case(engine, None, prompts, output_len, f"plain{batch}-")
        spec_s, spec_outputs, decoder, passes = fixed_point(engine, oracle, prompts, outputs, k, output_len,
                                                            f"spec{batch}", max_passes)
        tokens = batch * output_len
        row = {"batch": batch, "k": k, "plain_tok_s": round(tokens / plain_s, 1), "spec_tok_s": round(tokens / spec_s, 1),
               "speedup": round(plain_s / spec_s, 3), "identical_to_plain": spec_outputs == outputs,
               "first_divergence_from_plain": first_divergences(outputs, spec_outputs), "oracle_passes": passes,
               "acceptance": decoder.stats.summary()}
        rows.append(row)
        print(f"oracle batch {batch:4d} k={k}: plain {row['plain_tok_s']:9.1f} tok/s, speculative "
              f"{row['spec_tok_s']:9.1f} tok/s, speedup {row['speedup']:.2f}x, passes {len(passes)}, identical to plain "
              f"{row['identical_to_plain']} {row['first_divergence_from_plain']}", flush=True)
    engine.scheduler.draft_proposer = None
    return rows


def fixed_point(engine: LLMEngine, oracle: OracleProposer, prompts: list[list[int]], outputs: list[list[int]], k: int,
                output_len: int, tag: str, max_passes: int) -> tuple[float, list[list[int]], Any, list[dict]]:
    """The target's greedy continuation can depend on the step's shape (bf16: a verification step of 1 + k tokens
    per row picks other GEMM kernels than a one-token step, and random weights leave near-tied argmaxes), so the
    oracle iterates: each speculative pass (k drafts for every row) proposes what the previous pass produced, until
    a pass reproduces its reference (every draft accepted). Returns the last pass's seconds, outputs, decoder and
    the passes' record; ``oracle.reference`` is left at that pass's outputs."""
    reference, passes = outputs, []
    for attempt in range(max_passes):
        oracle.reference = {tuple(p): p + o for p, o in zip(prompts, reference, strict=True)}
        decoder = make_decoder(oracle, k, adaptive=False, device=engine.config.model.device)
        spec_s, spec_outputs = run_case(engine, decoder, prompts, output_len, f"{tag}-{attempt}-")
        passes.append({"seconds": round(spec_s, 4), "reproduced_reference": spec_outputs == reference,
                       "acceptance_rate": decoder.stats.summary()["acceptance_rate"]})
        if spec_outputs == reference:
            break
        reference = spec_outputs
    oracle.reference = {tuple(p): p + o for p, o in zip(prompts, spec_outputs, strict=True)}
    return spec_s, spec_outputs, decoder, passes


def first_divergences(reference: list[list[int]], other: list[list[int]]) -> dict[str, Any]:
    """Where each row's output first differs from the reference (None: identical): tells an early numeric flip of a
    near-tied argmax (random weights, bf16) from a verification bug that would diverge everywhere at once."""
    where = [next((i for i, (a, b) in enumerate(zip(r, o, strict=True)) if a != b), None)
             for r, o in zip(reference, other, strict=True)]
    differing = sorted(i for i in where if i is not None)
    return {"rows_differing": len(differing), "rows": len(where),
            "median_position": differing[len(differing) // 2] if differing else None, "positions": differing[:32]}


def adaptive_run(engine: LLMEngine, batch: int, k: int, prompt_len: int, output_len: int, rounds: int) -> dict:
    """Plain vs the adaptive policy (oracle proposals), alternating; with the step costs the policy measured."""
    device, vocab = engine.config.model.device, engine.model.vocab_size
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(batch)]
    oracle = OracleProposer()
    _, outputs = run_case(engine, None, prompts, output_len, "ref-")
    passes = fixed_point(engine, oracle, prompts, outputs, k, output_len, f"ref{batch}", 3)[3]
    plain, adaptive, chosen, costs = [], [], [], []
    decoder = make_decoder(oracle, k, adaptive=True, device=device)  # one per engine, as the engine builds it
    splits: dict[str, dict[str, float]] = {}  # the last round's step() time by kind, per mode
    collections: dict[str, list[float]] = {"plain": [], "adaptive": []}  # full collections' ms inside the runs
    for r in range(rounds):
        plain_steps, adaptive_steps = CoreLoopStats(), CoreLoopStats()
        plain_steps.timeline, adaptive_steps.timeline = [], []  # the last round's steps, one by one
        plain.append(run_case(engine, None, prompts, output_len, f"p{r}-", plain_steps, collections["plain"])[0])
        before = decoder.stats.num_drafts
        adaptive.append(run_case(engine, decoder, prompts, output_len, f"a{r}-", adaptive_steps,
                                 collections["adaptive"])[0])
        splits = {"plain": step_split(plain_steps), "adaptive": step_split(adaptive_steps)}
        timelines = {"plain": plain_steps.timeline, "adaptive": adaptive_steps.timeline}
        chosen.append(decoder.stats.num_drafts - before)
        costs = [(n, round(seconds * 1e3, 3)) for n, seconds in decoder.policy.step_cost.points()]
    gate = {f"{bucket}": {("speculative" if mode else "plain"): round(decoder.gate.rate(bucket, mode) or 0.0, 1)
                          for mode in (True, False)} for bucket in decoder.gate.buckets}
    engine.scheduler.draft_proposer = None
    tokens = batch * output_len
    row = {"batch": batch, "k_max": k, "plain_tok_s": round(tokens / statistics.median(plain), 1),
           "adaptive_tok_s": round(tokens / statistics.median(adaptive), 1),
           "adaptive_vs_plain": round(statistics.median(plain) / statistics.median(adaptive), 4),
           "verification_rows": chosen, "plain_s": plain, "adaptive_s": adaptive, "oracle_passes": passes,
           "gate_tok_s": gate,  # per batch bucket, the last measured decode tokens/s of each mode
           "measured_step_ms": costs,  # the last round's (query tokens, median ms) per measured size
           "step_split": splits, "timeline": timelines, "timeline_diff": timeline_diff(timelines),
           "full_collections_ms": collections}
    print(f"adaptive batch {batch}: plain {row['plain_tok_s']} tok/s, adaptive {row['adaptive_tok_s']} tok/s "
          f"({row['adaptive_vs_plain']:.3f}x), verification rows {chosen}, measured ms {costs}, "
          f"step() split {splits}, full collections ms {collections}", flush=True)
    return row


# ---- 4. draft-model proposal cost ---------------------------------------------------------------------------
def draft_costs(preset: str, device: str, batches: list[int], k: int, prompt_len: int, repeats: int) -> list[dict]:
    from tokenmill.attention.backend import get_attention_backend
    from tokenmill.config import ModelConfig
    from tokenmill.model.loader import load_model
    from tokenmill.spec_decode.draft_model import DraftModelProposer

    model_config = ModelConfig(random_weights=preset, device=device)
    loaded = load_model(model_config, get_attention_backend("auto", device))
    block = 16
    blocks = cdiv(prompt_len + (repeats + 4) * (k + 1) + k, block) * max(batches) + 8
    proposer = DraftModelProposer(loaded, device, block, blocks, loaded.model.vocab_size, 4096)
    if device.startswith("cuda"):
        proposer.capture_graphs(max(batches))
    graphs, rows = proposer.graphs, []
    for batch in batches:
        row = {"batch": batch, "k": k}
        for mode in ("graphs", "eager") if graphs is not None else ("eager",):
            proposer.graphs = graphs if mode == "graphs" else None
            generator = torch.Generator().manual_seed(batch)
            ids = {f"{mode}{batch}-{i}": torch.randint(0, loaded.model.vocab_size, (prompt_len,),
                                                       generator=generator).tolist() for i in range(batch)}
            times = []
            for r in range(repeats + 3):  # each call: the previous drafts and one bonus token accepted
                requests = [DraftRequest(seq_id, tokens, k) for seq_id, tokens in ids.items()]
                sync(device)
                start = time.perf_counter()
                drafts = proposer.propose_many(requests, k)
                sync(device)
                if r >= 3:
                    times.append((time.perf_counter() - start) * 1e3)
                for seq_id, tokens in ids.items():
                    tokens.extend(drafts[seq_id] + [drafts[seq_id][0]])
            for seq_id in ids:
                proposer.release(seq_id)
            row[f"{mode}_ms"] = round(statistics.median(times), 3)
        if "graphs_ms" in row:
            row["eager_over_graphs"] = round(row["eager_ms"] / row["graphs_ms"], 3)
        rows.append(row)
        print(f"draft {preset} batch {batch:3d} k={k}: " + ", ".join(f"{key} {value}" for key, value in row.items()
                                                              if key.endswith("ms") or key.startswith("eager_over")),
              flush=True)
    proposer.graphs = graphs
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--ks", default="1,2,3,4,5,6,7,8", help="k = 8 runs 9 query tokens: eager, prefill kernel")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--oracle-batches", default="1,16,64")
    parser.add_argument("--oracle-k", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--adaptive-batches", default="1,256")
    parser.add_argument("--adaptive-output-len", type=int, default=64)
    parser.add_argument("--adaptive-rounds", type=int, default=3)
    parser.add_argument("--draft-preset", default="qwen3-0.6b", help="draft model shape for part 4 ('' skips it)")
    parser.add_argument("--draft-batches", default="1,4,16,64")
    parser.add_argument("--dtype", default="auto", help="float32: tells bf16 numerics from a verification bug")
    parser.add_argument("--skip-costs", action="store_true", help="skip part 1 (verification step costs)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU check of the script)")
    parser.add_argument("--out", default="gpu_spec_decode.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    ks = [int(k) for k in args.ks.split(",")]
    oracle_batches = [int(b) for b in args.oracle_batches.split(",")]
    if args.quick:
        batches, ks, oracle_batches = [1, 4], [1, 4, 8], [1, 4]
        args.context, args.repeats, args.prompt_len, args.output_len = 32, 3, 16, 12
        args.adaptive_batches, args.adaptive_output_len, args.adaptive_rounds = "1,8", 6, 1
    adaptive_batches = [int(b) for b in args.adaptive_batches.split(",")]
    draft_batches = [1, 4] if args.quick else [int(b) for b in args.draft_batches.split(",")]
    max_batch = max(*batches, *oracle_batches, *adaptive_batches)
    block = 16
    context_blocks = cdiv(args.context + max(ks) + 1, block) * max(batches)
    run_blocks = cdiv(max(args.prompt_len + args.output_len, args.prompt_len + args.adaptive_output_len) + 9,
                      block) * max_batch
    # k = 7: graphs for every verification length the decode kernel serves (1 + k <= 8); proposers are swapped in.
    engine = LLMEngine.from_kwargs(
        random_weights=args.preset, device=args.device, dtype=args.dtype, max_model_len=max(args.context + 16, 1024) if not args.quick
        else 128, max_num_seqs=max_batch, num_kv_blocks=max(context_blocks, run_blocks) + 8, block_size=block,
        enable_prefix_caching=False, stream_outputs=False,
        speculative_config={"method": "ngram", "num_speculative_tokens": 7, "adaptive": False})
    engine.scheduler.draft_proposer = None
    # As `tokenmill serve` and `bench throughput` do: a full collection rescanning the start-up heap stalls one
    # step by ~130 ms (H100, 2026-12-07: the whole 0.92x of an adaptive round with no drafts at batch 256).
    freeze_startup_heap()
    started = time.perf_counter()
    costs = [] if args.skip_costs else verification_costs(engine, batches, ks, args.context, args.repeats)
    oracle = oracle_runs(engine, oracle_batches, args.oracle_k, args.prompt_len, args.output_len)
    adaptive = [adaptive_run(engine, batch, args.oracle_k, args.prompt_len, args.adaptive_output_len,
                             args.adaptive_rounds) for batch in adaptive_batches]
    del engine  # part 4 loads its own model
    drafts = draft_costs(args.draft_preset if not args.quick else "tiny-llama", args.device, draft_batches,
                         args.oracle_k, args.prompt_len, args.repeats) if args.draft_preset else []
    path = write_record(Path(args.out), "gpu_spec_decode", preset=args.preset, dtype=args.dtype, context=args.context,
                        verification_cost=costs, oracle=oracle, adaptive=adaptive, draft_proposal=drafts,
                        seconds=round(time.perf_counter() - started, 1),
                        **({"device": "cpu"} if not args.device.startswith("cuda") else {}))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
