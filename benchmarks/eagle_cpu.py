"""An EAGLE-1 draft head for SmolLM2-135M (the embedded GGUF), trained and measured on this CPU (issue 24).

Stages (each skippable): the teacher's post-norm last hidden states over its own chat answers (cached: --features),
training the head on all but the last --heldout answers (tokenmill/distill/eagle_train.py), then measurement:
teacher-forced top-1 agreement and replayed acceptance lengths on the held-out answers, and the reference loop
(tokenmill/spec_decode/eagle_reference.py: the target verifies each round; its output is asserted token-identical to
plain greedy) on spec_decode_cpu.py's chat prompts and the first --reference-prompts held-out prompts, with
--time-rounds > 0 timing both (medians of paired runs, same process).

    PYTHONPATH=. python3 benchmarks/eagle_cpu.py --answers /tmp/s17d/train_answers.jsonl \
        --features /tmp/s18e/features.pt --head /tmp/s18e/head --steps 2000 --threads 2
    PYTHONPATH=. python3 benchmarks/eagle_cpu.py --answers ... --features ... --head /tmp/s18e/head --skip-train \
        --reference-prompts 20 --time-rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenmill.distill.eagle_data import FeatureSet, compute_features, read_answers  # noqa: E402
from tokenmill.distill.eagle_head import EagleHead  # noqa: E402
from tokenmill.distill.eagle_train import EagleTrainConfig, teacher_forced_agreement, train  # noqa: E402
from tokenmill.spec_decode.draft_vocab import count_token_ids, load_draft_vocab, write_draft_vocab  # noqa: E402
from tokenmill.spec_decode.eagle_reference import (  # noqa: E402
    EagleDrafter,
    plain_greedy,
    replay,
    speculative_greedy,
)

RESULTS = Path(__file__).resolve().parent / "results"


def load_features(args: argparse.Namespace, teacher, records: list[dict]) -> tuple[FeatureSet, dict]:
    path = Path(args.features)
    if path.is_file():
        return FeatureSet.load(path), {"cached": str(path)}
    data, check = compute_features(teacher, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.save(path)
    return data, check


def mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


def replay_summary(head: EagleHead, data: FeatureSet, ks: list[int], rows_ids) -> dict:
    out = {}
    for k in ks:
        lengths = [n for i in range(len(data)) for n in replay(head, *data.sequence(i), k, rows_ids)]
        out[f"k{k}"] = {"mean_acceptance_length": mean(lengths), "rounds": len(lengths)}
    return out


def chat_prompt_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def paired_timing(teacher, head: EagleHead, prompts: list[list[int]], k: int, rows_ids, max_new: int,
                  eos_id: int | None, rounds: int) -> dict:
    """Wall time of plain greedy vs EAGLE greedy at ``k``, back to back per prompt, order alternating."""
    ratios, plain_s, spec_s, tokens = [], 0.0, 0.0, 0
    for r in range(rounds):
        for i, prompt in enumerate(prompts):
            times = {}
            for which in (("plain", "spec") if (r + i) % 2 == 0 else ("spec", "plain")):
                started = time.perf_counter()
                if which == "plain":
                    tokens += len(plain_greedy(teacher, prompt, max_new, eos_id))
                else:
                    speculative_greedy(teacher, EagleDrafter(head, rows_ids), prompt, k, max_new, eos_id)
                times[which] = time.perf_counter() - started
            ratios.append(times["plain"] / times["spec"])
            plain_s, spec_s = plain_s + times["plain"], spec_s + times["spec"]
    return {"k": k, "rounds": rounds, "plain_tok_s": round(tokens / plain_s, 2),
            "eagle_tok_s": round(tokens / spec_s, 2), "speedup": round(plain_s / spec_s, 3),
            "median_pair_speedup": round(statistics.median(ratios), 3), "pair_speedups": [round(x, 3) for x in ratios]}


def reference_runs(teacher, head: EagleHead, prompts: list[list[int]], ks: list[int], rows_ids, max_new: int,
                   eos_id: int | None, time_rounds: int = 0, time_ks: list[int] = (),
                   deadline: float | None = None) -> dict:
    """Acceptance per k from the real loop, every output asserted equal to plain greedy; with ``time_rounds``,
    paired wall times at each of ``time_ks``. A k whose turn comes after ``deadline`` (``time.time()``) is left
    out and named."""
    plain = [plain_greedy(teacher, p, max_new, eos_id) for p in prompts]
    out: dict = {"output_tokens": sum(len(t) for t in plain)}
    for k in ks:
        if deadline is not None and time.time() > deadline:
            out.setdefault("not_run_past_deadline", []).append(k)
            continue
        lengths = []
        for prompt, expected in zip(prompts, plain, strict=True):
            result = speculative_greedy(teacher, EagleDrafter(head, rows_ids), prompt, k, max_new, eos_id)
            if result.tokens != expected:
                raise AssertionError(f"k={k}: EAGLE output differs from plain greedy for prompt {prompt[-8:]}")
            lengths += result.round_lengths
        out[f"k{k}"] = {"mean_acceptance_length": mean(lengths), "rounds": len(lengths), "token_identical": True}
    for k in time_ks:
        out[f"timing_k{k}"] = paired_timing(teacher, head, prompts, k, rows_ids, max_new, eos_id, time_rounds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers", required=True, help="teacher answers JSONL (prompt_ids + output_ids)")
    parser.add_argument("--features", required=True, help="feature cache (.pt), written if missing")
    parser.add_argument("--head", required=True, help="the head's directory (written by training)")
    parser.add_argument("--heldout", type=int, default=133, help="the last N answers: never trained on")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--init-from", default=None, help="continue training this head directory")
    parser.add_argument("--extra-features", action="append", default=[],
                        help="another feature cache (eagle_data.FeatureSet) to train on too")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--token-weight", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--unroll", type=int, default=1, help="1-5: also train draft steps 2..n on the head's own "
                                                               "predicted features (eagle_train.draft_passes)")
    parser.add_argument("--prompt-positions", action="store_true", help="train on the prompts' positions too")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", default=None, help="ISO time (e.g. 2026-12-07T06:30+00:00): stop training then")
    parser.add_argument("--draft-vocab-size", type=int, default=4096, help="0: the whole head")
    parser.add_argument("--ks", default="4,2,3,5")
    parser.add_argument("--replay-sequences", type=int, default=0, help="held-out answers replayed (0: all)")
    parser.add_argument("--reference-prompts", type=int, default=10, help="held-out prompts in the real loop")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--time-rounds", type=int, default=0, help="timed rounds over the chat prompts (0: none)")
    parser.add_argument("--time-ks", default="2,3,4", help="k values timed against plain greedy")
    parser.add_argument("--threads", type=int, default=2, help="torch threads while training")
    parser.add_argument("--measure-threads", type=int, default=1,
                        help="torch threads for replays, reference loops and timings (one-token steps: a second "
                             "spinning thread only costs on a shared box)")
    parser.add_argument("--no-full-vocab-replay", dest="full_vocab_replay", action="store_false")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from spec_decode_cpu import prompts as benchmark_prompts

    from tokenmill.distill.llm import load_teacher

    started = datetime.datetime.now(datetime.UTC)
    record: dict = {"date": started.isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                    "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads training, "
                              f"{args.measure_threads} measuring, {os.cpu_count()} cores",
                    "load_average_start": os.getloadavg()}
    teacher, tokenizer, source = load_teacher(None)
    record["teacher"] = source
    records = read_answers(Path(args.answers))
    data, check = load_features(args, teacher, records)
    record["features"] = check
    train_set, heldout = data.subset(range(len(data) - args.heldout)), data.subset(range(len(data) - args.heldout,
                                                                                          len(data)))
    for extra in args.extra_features:  # more answers (other prompts) for training only; the held-out set stays
        more = FeatureSet.load(Path(extra))
        train_set = FeatureSet.from_sequences(*zip(*([train_set.sequence(i) for i in range(len(train_set))]
                                                     + [more.sequence(i) for i in range(len(more))]), strict=True))
        record.setdefault("extra_features", []).append({"path": extra, "sequences": len(more)})
    head_dir = Path(args.head)
    vocab = teacher.config.vocab_size
    if not args.skip_train:
        head = (EagleHead.load(Path(args.init_from), teacher.get_input_embeddings().weight,
                               teacher.get_output_embeddings().weight) if args.init_from
                else EagleHead.from_target(teacher))
        size = args.draft_vocab_size or None
        head.save(head_dir, size)
        inherited = Path(args.init_from or "") / "draft_vocab.json"
        if size is not None and args.init_from and inherited.is_file():  # keep the rows the head was trained on
            (head_dir / "draft_vocab.json").write_bytes(inherited.read_bytes())
        elif size is not None:  # the ranking: answer tokens of the training answers (as --draft-vocab-size does)
            answers = [torch.tensor(r["output_ids"]) for r in records[: len(records) - args.heldout]]
            write_draft_vocab(head_dir, count_token_ids(answers, vocab), size)
        rows_ids = load_draft_vocab(head_dir, vocab)
        config = EagleTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  warmup_steps=args.warmup_steps, feature_weight=args.feature_weight,
                                  token_weight=args.token_weight, noise=args.noise, unroll=args.unroll,
                                  prompt_positions=args.prompt_positions, seed=args.seed, eval_every=args.eval_every)
        probe = heldout.subset(range(min(40, len(heldout))))

        def on_eval(step: int, trained: EagleHead) -> dict:  # a checkpoint + k = 4 replay on 40 held-out answers
            trained.save(head_dir / "checkpoints" / f"step_{step:06d}", size)
            if size is not None:
                (head_dir / "checkpoints" / f"step_{step:06d}" / "draft_vocab.json").write_bytes(
                    (head_dir / "draft_vocab.json").read_bytes())
            torch.set_num_threads(args.measure_threads)
            replayed = replay_summary(trained, probe, [4], rows_ids)["k4"]
            torch.set_num_threads(args.threads)
            return {"replay_k4_first40": replayed}

        deadline = (datetime.datetime.fromisoformat(args.deadline).timestamp() if args.deadline else None)
        history = train(head, train_set, config, rows_ids, heldout, log=lambda m: print(m, flush=True),
                        on_eval=on_eval, deadline=deadline)
        head.save(head_dir, size)
        (head_dir / "train_history.json").write_text(json.dumps(history))
        record["training"] = {"config": history["config"], "evals": history["evals"], "seconds": history["seconds"],
                              "train_sequences": len(train_set), "init_from": args.init_from,
                              "stopped_early_at_step": history.get("stopped_early_at_step"),
                              "final_losses": history["steps"][-1]}
    torch.set_num_threads(args.measure_threads)
    head = EagleHead.load(head_dir, teacher.get_input_embeddings().weight, teacher.get_output_embeddings().weight)
    rows_ids = load_draft_vocab(head_dir, vocab)
    record["draft_vocab_size"] = None if rows_ids is None else rows_ids.numel()
    ks = [int(k) for k in args.ks.split(",")]
    replay_set = heldout if not args.replay_sequences else heldout.subset(range(args.replay_sequences))
    record["heldout"] = {"sequences": len(replay_set), **teacher_forced_agreement(head, replay_set, rows_ids),
                         "replay": replay_summary(head, replay_set, ks, rows_ids)}
    if rows_ids is not None and args.full_vocab_replay:
        record["heldout"]["replay_full_vocab_k4"] = replay_summary(head, replay_set, [4], None)["k4"]
    print(json.dumps(record["heldout"]), flush=True)
    eos = tokenizer.eos_token_id
    chat = chat_prompt_ids(tokenizer, benchmark_prompts(1)["chat"])
    time_ks = [int(k) for k in args.time_ks.split(",")] if args.time_rounds else []
    record["chat_prompts"] = reference_runs(teacher, head, chat, ks, rows_ids, args.max_tokens, eos, args.time_rounds,
                                            time_ks)
    print(json.dumps(record["chat_prompts"]), flush=True)
    if args.reference_prompts:
        held = [records[len(records) - args.heldout + i]["prompt_ids"] for i in range(args.reference_prompts)]
        record["heldout_reference"] = reference_runs(teacher, head, held, ks, rows_ids, args.max_tokens, eos)
        print(json.dumps(record["heldout_reference"]), flush=True)
    record["load_average_end"] = os.getloadavg()
    record["seconds"] = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 1)
    stamp = started.strftime("%Y-%m-%d_%H%M")
    out = RESULTS / f"distill_eagle{('_' + args.tag) if args.tag else ''}_{stamp}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
