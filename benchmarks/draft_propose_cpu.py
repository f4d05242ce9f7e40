"""What one draft-model proposal costs at batch 1 on CPU, by reduced vocabulary size: ``DraftModelProposer.
propose_many`` (k drafts) timed call by call while walking the embedded SmolLM2's own greedy answer to a chat
prompt (each call sees one more accepted token, as in decoding), split into the draft's layers
(``model.forward``), its output head (``compute_logits``) and the rest (Python, KV bookkeeping, metadata, argmax).
The sizes alternate round by round so a load burst on a shared box hits all of them; the target's own plain
decoding step is timed in the same process for scale. JSON with date, device and the exact command.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/draft_propose_cpu.py --draft-model DIR \\
        --draft-vocab-sizes 2048,4096,8192,16384,full --rounds 2 --out benchmarks/results/draft_propose_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_record import write_record  # noqa: E402
from spec_decode_cpu import cpu_device, load_averages  # noqa: E402

from tokenmill import SamplingParams  # noqa: E402
from tokenmill.config import SpeculativeConfig  # noqa: E402
from tokenmill.engine.llm import LLM  # noqa: E402
from tokenmill.spec_decode.decoder import DraftRequest  # noqa: E402
from tokenmill.spec_decode.draft_model import DraftModelProposer  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper."


class Split:
    """Seconds inside the draft model's forward and its head, wrapped on the instance."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = self.head = 0.0
        forward, logits = model.forward, model.compute_logits

        def timed_forward(*args, **kwargs):
            started = time.perf_counter()
            out = forward(*args, **kwargs)
            self.layers += time.perf_counter() - started
            return out

        def timed_logits(*args, **kwargs):
            started = time.perf_counter()
            out = logits(*args, **kwargs)
            self.head += time.perf_counter() - started
            return out

        model.forward, model.compute_logits = timed_forward, timed_logits


def time_proposer(proposer: DraftModelProposer, ids: list[int], start: int, k: int) -> dict[str, float]:
    proposer.propose_many([DraftRequest("s", ids[:start], k)], k)  # catch-up over the prompt, untimed
    split = Split(proposer.model)
    started = time.perf_counter()
    calls = 0
    for end in range(start + 1, len(ids)):
        proposer.propose_many([DraftRequest("s", ids[:end], k)], k)
        calls += 1
    total = time.perf_counter() - started
    proposer.release("s")
    ms = lambda seconds: seconds / calls * 1e3  # noqa: E731
    return {"ms_per_call": ms(total), "layers_ms": ms(split.layers), "head_ms": ms(split.head),
            "rest_ms": ms(total - split.layers - split.head), "calls": calls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft-model", required=True)
    parser.add_argument("--draft-vocab-sizes", default="4096,full")
    parser.add_argument("--draft-dtype", default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    llm = LLM(None, dtype="float32", max_model_len=2048, max_num_seqs=1)
    prompt = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": PROMPT}])
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    answer = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    ids = list(prompt) + list(answer)
    vocab = llm.engine.model.vocab_size
    proposers = {}
    for size in args.draft_vocab_sizes.split(","):
        config = SpeculativeConfig(model=args.draft_model, num_speculative_tokens=args.k, draft_dtype=args.draft_dtype,
                                   draft_vocab_size=vocab if size == "full" else int(size))
        proposers[size] = DraftModelProposer.for_target(config, llm.engine, "cpu")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {size: [] for size in proposers}
    plain_ms = []
    for _ in range(args.rounds):
        for size, proposer in proposers.items():
            runs[size].append(time_proposer(proposer, ids, len(prompt) + 1, args.k))
        started = time.perf_counter()
        llm.generate([prompt], greedy, use_tqdm=False)
        plain_ms.append((time.perf_counter() - started) / args.max_tokens * 1e3)
    results = {}
    target_ms = statistics.median(plain_ms)
    print(f"target plain decoding: {target_ms:.1f} ms/token (median of {args.rounds}, prefill included)")
    for size, rows in runs.items():
        row = {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
        row["ms_per_draft_token"] = round(row["ms_per_call"] / args.k, 2)
        row["draft_token_vs_target_token"] = round(row["ms_per_draft_token"] / target_ms, 3)
        results[size] = row
        print(f"draft vocab {size:>6s}: {row['ms_per_call']:6.2f} ms per k={args.k} call (layers "
              f"{row['layers_ms']:.2f}, head {row['head_ms']:.2f}, rest {row['rest_ms']:.2f}) = "
              f"{row['ms_per_draft_token']:.2f} ms a draft token, {row['draft_token_vs_target_token']:.3f} of a "
              "target token", flush=True)
    load = load_averages(load_before)
    if args.out:
        path = write_record(
            Path(args.out), "draft_propose_cpu", model=llm.engine.model_name, config=vars(args), results=results,
            device=cpu_device(), load_average=load, target_plain_ms_per_token=round(target_ms, 2), prompt=PROMPT)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
