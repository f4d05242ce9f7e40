"""``tokenmill distill --target draft|encoder|eagle --teacher T [--student S] --data TEXT --out DIR``."""

from __future__ import annotations

import argparse

from tokenmill.distill.config import HIDDEN_LAYERS, INTERMEDIATE_INITS, KD_LOSSES, TARGETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("distill", help="train a smaller student from a teacher (draft decoder, encoder or "
                                               "EAGLE draft head)")
    p.add_argument("--target", default="draft", choices=TARGETS,
                   help="draft: a small decoder sharing the teacher's tokenizer (speculative draft); "
                        "encoder: a small BERT-family sentiment/embedding model for serve-models; eagle: an "
                        "EAGLE-1 draft head (one decoder layer on the teacher's last hidden states) trained on the "
                        "teacher's own answers, for --speculative-config '{\"method\": \"eagle\", \"model\": OUT}'")
    p.add_argument("--teacher", default=None,
                   help="draft, eagle: HF dir or .gguf (default: embedded SmolLM2); encoder: BERT-family dir "
                        "(default: bundled MiniLM + sentiment head)")
    p.add_argument("--teacher-head", default=None, help="encoder: the teacher's head JSON (with --teacher DIR)")
    p.add_argument("--student", default=None, help="an HF directory to start the student from (same tokenizer)")
    p.add_argument("--student-layers", type=int, default=None, help="student depth (default: half the teacher's)")
    p.add_argument("--layer-map", type=_layers, default=None,
                   help="teacher layers the student's layers start from, e.g. 0,4,5 (default: evenly spaced, "
                        "first and last kept)")
    p.add_argument("--student-hidden-size", type=int, default=None, help="student width (default: the teacher's)")
    p.add_argument("--student-intermediate-size", type=int, default=None,
                   help="student FFN width (default: the teacher's, scaled with --student-hidden-size)")
    p.add_argument("--intermediate-init", default="norm", choices=INTERMEDIATE_INITS,
                   help="a narrower FFN at the teacher's width starts from the teacher's FFN neurons with the largest "
                        "in x out weight norms (norm) or its first ones (first)")
    p.add_argument("--data", default=None, help="text or JSONL ({\"text\": ...}) file (default: bundled KJV)")
    p.add_argument("--eval-data", default=None, help="held-out text (default: bundled KJV held-out, or the "
                                                      "data's last 10%% when --data is given)")
    p.add_argument("--teacher-generated", type=int, default=None, metavar="N",
                   help="draft: train on the teacher's own answers to the first N chat prompts (sequence-level KD; "
                        "generated once with tokenmill's engine, cached as JSONL, last tenth held out); eagle: "
                        "always (default 1000)")
    p.add_argument("--prompts", default=None,
                   help="draft, eagle: chat prompts for --teacher-generated, one per line (default: bundled "
                        "templates x topics, disjoint from the benchmarks' prompts; benchmarks/distill_self_prompts.py "
                        "writes ones the teacher wrote itself)")
    p.add_argument("--teacher-generated-cache", default=None,
                   help="JSONL of the teacher's answers, reused and extended (default: OUT/teacher_generated.jsonl)")
    p.add_argument("--teacher-max-tokens", type=int, default=128, help="longest teacher answer generated")
    p.add_argument("--teacher-temperature", type=float, default=0.0, help="0: greedy teacher answers")
    p.add_argument("--draft-vocab-size", type=int, default=None, metavar="N",
                   help="draft, eagle: also write the token ranking of the training text (draft_vocab.json) and "
                        "let the draft propose from its N most frequent ids (a cheaper output head on CPU)")
    p.add_argument("--feature-weight", type=float, default=None,
                   help="eagle: weight of the smooth-L1 regression of the teacher's next features (default 1)")
    p.add_argument("--token-weight", type=float, default=None,
                   help="eagle: weight of the KL to the teacher's next-token distribution (default 1)")
    p.add_argument("--feature-noise", type=float, default=None,
                   help="eagle: uniform noise on the input features, x their RMS (default 0.1)")
    p.add_argument("--unroll", type=int, default=None,
                   help="eagle: draft steps trained per position, 1-5; 2+ trains the later ones on the head's own "
                        "predicted features (default 2)")
    p.add_argument("--prompt-positions", action=argparse.BooleanOptionalAction, default=None,
                   help="eagle: learn the teacher's features over the prompts' tokens too (default: yes)")
    p.add_argument("--out", required=True, help="output directory: the student, checkpoints/, summary, plot")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (draft, default 8), sentences (encoder, default 32) or answers (eagle, default "
                        "16) per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=128,
                   help="draft: tokens per window; encoder: max tokens (eagle: whole answers)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 5e-4 draft, 1e-3 encoder, 3e-3 eagle)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW's (default: 0.01; eagle 0)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the KD loss (T² scaled)")
    p.add_argument("--kd-loss", default="forward_kl", choices=KD_LOSSES)
    p.add_argument("--jsd-beta", type=float, default=0.5, help="mixture weight of --kd-loss jsd")
    p.add_argument("--hidden-weight", type=float, default=None,
                   help="weight of per-token hidden-state MSE to the teacher (default: 0 draft, 30 encoder)")
    p.add_argument("--hidden-layers", default=None, choices=HIDDEN_LAYERS,
                   help="all: each student layer vs the teacher layer it came from; last: the last layers only "
                        "(default: all draft, last encoder)")
    p.add_argument("--embedding-weight", type=float, default=1.0, help="encoder: weight of 1 - cosine to the "
                                                                       "teacher's pooled embedding")
    p.add_argument("--freeze-word-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the word embeddings fixed (encoder default: yes when copied from the teacher; draft: "
                        "with tied embeddings this also fixes the output head)")
    p.add_argument("--student-dropout", type=float, default=0.0,
                   help="encoder: dropout of the student while it trains (default 0: it imitates a fixed teacher)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (0: start and end)")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=50, help="0: only the final checkpoint")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT/checkpoints' newest (or the given) checkpoint, bit-exactly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] (bf16 autocast on CUDA)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="CUDA: train in fp32")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="CPU: autocast to bf16 too (CPUs with AMX / AVX512-BF16 run its matmuls ~3x faster; "
                        "fp32 master weights)")
    p.add_argument("--repository", default=None, help="encoder: also export the student (ONNX, validated) here")
    p.add_argument("--name", default=None, help="encoder: model name in --repository (default: OUT's name)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_distill)


def _layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices") from None


def run_distill(args: argparse.Namespace) -> int:
    from tokenmill.distill.config import DistillConfig
    from tokenmill.distill.run import distill

    fields = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    summary = distill(DistillConfig(**fields))
    what = "the EAGLE head" if args.target == "eagle" else "the student"
    print(f"wrote {what} to {summary.get('student_dir')} and {args.out}/distill_summary.json")
    return 0
