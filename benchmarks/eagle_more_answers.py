"""More training data for the EAGLE head (benchmarks/eagle_cpu.py --extra-features): the teacher's greedy answers to
prompts not yet answered, with its features taken while it generates (eagle_data.generate_with_features; batches of
32, left-padded, transformers fp32), until a time budget runs out.

Prompts, in order: the kinds prompts after the first 1,326 (distill_kinds_prompts_2026-12-07.txt: the 1,326 are
session 17's answered training prompts), then the bundled template x topic prompts; any prompt already answered in
--answers (the held-out ones included) is skipped.

    PYTHONPATH=. python3 benchmarks/eagle_more_answers.py --answers /tmp/s17d/train_answers.jsonl --seconds 1500 \
        --out-answers /tmp/s18e/more_answers.jsonl --out-features /tmp/s18e/features_more.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tokenmill.distill.eagle_data import FeatureSet, generate_with_features, read_answers
from tokenmill.distill.teacher_data import bundled_prompts

KINDS = Path(__file__).resolve().parent / "results" / "distill_kinds_prompts_2026-12-07.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", required=True, help="answers already made (their prompts are skipped)")
    parser.add_argument("--seconds", type=float, default=1500, help="no new batch starts after this")
    parser.add_argument("--skip-kinds", type=int, default=1326, help="kinds prompts already answered")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-answers", required=True)
    parser.add_argument("--out-features", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tokenmill.distill.llm import load_teacher

    deadline = time.time() + args.seconds
    teacher, tokenizer, _ = load_teacher(None)
    old = read_answers(Path(args.answers))
    seen = {r["prompt"].strip().lower() for r in old}

    def prompt_ids(text: str) -> list[int]:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)

    if prompt_ids(old[0]["prompt"]) != old[0]["prompt_ids"]:
        raise SystemExit("the chat template's ids differ from the answers' prompt_ids")
    texts = []
    for text in KINDS.read_text().splitlines()[args.skip_kinds :] + bundled_prompts(0):
        if text.strip() and text.strip().lower() not in seen:
            seen.add(text.strip().lower())
            texts.append(text.strip())
    records, features = [], []
    started = time.time()
    for lo in range(0, len(texts), args.batch_size):
        if time.time() > deadline:
            break
        batch = texts[lo : lo + args.batch_size]
        ids = [prompt_ids(t) for t in batch]
        answers, feats = generate_with_features(teacher, ids, args.max_tokens, tokenizer.eos_token_id)
        records += [{"prompt": t, "prompt_ids": p, "output_ids": a, "max_tokens": args.max_tokens,
                     "temperature": 0.0, "seed": 0, "source": "transformers batched greedy"}
                    for t, p, a in zip(batch, ids, answers, strict=True)]
        features += feats
        print(f"{len(records)}/{len(texts)} answers, {time.time() - started:.0f} s", flush=True)
    Path(args.out_answers).write_text("".join(json.dumps(r) + "\n" for r in records))
    FeatureSet.from_sequences([torch.tensor(r["prompt_ids"] + r["output_ids"]) for r in records], features,
                              [len(r["prompt_ids"]) for r in records]).save(Path(args.out_features))
    print(f"wrote {len(records)} answers", flush=True)


if __name__ == "__main__":
    main()
