"""Where a draft agrees with its target: teacher-forced top-1 agreement of a draft model along the target's own
greedy answers, per prompt set, and the k-token greedy acceptance length those hits imply.

Greedy speculative decoding accepts draft token i of a round only if tokens 1..i-1 were accepted, and then the
draft has seen exactly the target's tokens; so the hit/miss sequence along the target's greedy answer decides
every round (``implied_acceptance_length`` replays it) and agrees with the engine's count when the draft is fed
the verified context correctly. Prompt sets: ``distill`` (distill_cpu.py's six chat prompts), ``engine``
(spec_decode_cpu.py's three chat prompts), ``heldout`` (the last tenth of a teacher_generated.jsonl, the answers
a --teacher-generated run holds out; ``--heldout-count`` of them). Answers stop at EOS or --max-new tokens.

    OMP_NUM_THREADS=1 PYTHONPATH=. python3 benchmarks/distill_draft_agreement.py --draft DIR \\
        --answers OUT/teacher_generated.jsonl --answers-prompts N --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_cpu import CHAT_PROMPTS, round_tokens  # noqa: E402
from gpu_record import write_record  # noqa: E402
from spec_decode_cpu import cpu_device, prompts  # noqa: E402

from tokenmill.distill.data import HELDOUT_FRACTION  # noqa: E402
from tokenmill.distill.llm import load_teacher  # noqa: E402


def implied_acceptance_length(hits: list[bool], k: int) -> list[int]:
    """Tokens emitted per round of greedy speculation with k drafts, given whether the draft's argmax matched the
    target's token at each position of the target's answer (a round: the leading hits, up to k, plus one)."""
    done, rounds = 0, []
    while done < len(hits):
        rounds.append(round_tokens(hits[done : done + k], k, len(hits) - done))
        done += rounds[-1]
    return rounds


@torch.no_grad()
def hits_along(draft, prompt_ids: list[int], answer: list[int]) -> list[bool]:
    full = torch.tensor([prompt_ids + answer])
    guesses = draft(full).logits[0, len(prompt_ids) - 1 : -1].argmax(-1)
    return (guesses == torch.tensor(answer)).tolist()


@torch.no_grad()
def greedy_answer(teacher, prompt_ids: list[int], max_new: int, eos: int) -> list[int]:
    out = teacher.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                           pad_token_id=eos)[0, len(prompt_ids):].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def summarize(per_prompt: list[tuple[str, list[bool]]], k: int) -> dict:
    hits = [h for _, prompt_hits in per_prompt for h in prompt_hits]
    rounds = [n for _, prompt_hits in per_prompt for n in implied_acceptance_length(prompt_hits, k)]
    position_hits = [0] * k  # rounds whose first i+1 drafts were all accepted
    for n in rounds:
        for i in range(min(n - 1, k)):
            position_hits[i] += 1
    return {"answers": len(per_prompt), "tokens": len(hits), "top1_agreement": round(sum(hits) / len(hits), 4),
            "implied_mean_acceptance_length": round(sum(rounds) / len(rounds), 3), "rounds": len(rounds),
            "accepted_per_position": position_hits,
            "per_prompt": [{"prompt": p[:80], "tokens": len(h), "top1_agreement": round(sum(h) / len(h), 3),
                            "hits": "".join("1" if x else "." for x in h)} for p, h in per_prompt]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", required=True, help="the draft's HF directory")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=96)
    parser.add_argument("--sets", default="distill,engine,heldout")
    parser.add_argument("--answers", type=Path, default=None, help="teacher_generated.jsonl (for 'heldout')")
    parser.add_argument("--answers-prompts", type=int, default=None, help="the run's --teacher-generated N")
    parser.add_argument("--heldout-count", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    load_before = os.getloadavg()
    teacher, tokenizer, _ = load_teacher(None)
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    chat_ids = lambda p: tokenizer.apply_chat_template([{"role": "user", "content": p}],  # noqa: E731
                                                       add_generation_prompt=True, tokenize=True, return_dict=False)
    results = {}
    for name in args.sets.split(","):
        if name in ("distill", "engine"):
            texts = CHAT_PROMPTS if name == "distill" else prompts(600)["chat"]
            pairs = []
            for text in texts:
                ids = list(chat_ids(text))
                pairs.append((text, ids, greedy_answer(teacher, ids, args.max_new, eos)))
        elif name == "heldout":
            if args.answers is None or args.answers_prompts is None:
                parser.error("the 'heldout' set needs --answers and --answers-prompts")
            records = [json.loads(line) for line in args.answers.read_text().splitlines() if line.strip()]
            records = records[: args.answers_prompts]
            held = records[len(records) - max(1, round(len(records) * HELDOUT_FRACTION)):]
            pairs = [(r["prompt"], r["prompt_ids"], r["output_ids"]) for r in held[: args.heldout_count]]
        else:
            parser.error(f"unknown prompt set {name!r} (distill, engine, heldout)")
        results[name] = summarize([(p, hits_along(draft, ids, answer)) for p, ids, answer in pairs], args.k)
        row = results[name]
        print(f"{name:8s}: {row['answers']} answers, {row['tokens']} tokens, top-1 agreement {row['top1_agreement']:.3f}, "
              f"implied k={args.k} acceptance length {row['implied_mean_acceptance_length']:.2f}, accepted per "
              f"position {row['accepted_per_position']} of {row['rounds']} rounds", flush=True)
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    if args.out:
        path = write_record(Path(args.out), "distill_draft_agreement", draft=args.draft, config=vars(args) | {
            "answers": str(args.answers), "draft": args.draft}, results=results, device=cpu_device(),
            load_average=load)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
