"""A real, short `tokenmill distill` run for both targets, then the student measured against its teacher.

encoder: MiniLM-L6 + sentiment head -> a shallower student; held-out sentiment accuracy (teacher, student),
  agreement, embedding cosine, then exported through the ONNX pipeline and timed with `bench-model`'s code
  (ONNX Runtime, CPU) beside the teacher's graph.
draft: embedded SmolLM2-135M -> a 6-layer student; held-out perplexity, KL and top-1 agreement, batch-1 greedy
  tokens/s of each, mean acceptance length of greedy speculative decoding with k draft tokens on chat prompts
  (exact, by replaying the teacher's greedy continuation), and transformers' assisted generation (the student
  as assistant_model) vs the teacher alone, end to end, batch 1.

    python benchmarks/distill_cpu.py                        # both targets, ~10 min each on an idle 2-core CPU
    python benchmarks/distill_cpu.py --targets encoder --encoder-steps 40

Writes benchmarks/results/distill_<target>_<date>.json (+ .png: loss curve, quality, speed) with date, machine,
load averages and the exact command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.run import distill

RESULTS = Path(__file__).parent / "results"
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a neural network is in two sentences.",
    "Give me three tips for staying focused while studying.",
    "How do I make a cup of tea?",
    "What is the difference between weather and climate?",
]


def header(args: argparse.Namespace, target: str) -> dict:
    return {"benchmark": f"distill_{target}", "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_start": os.getloadavg(), "device": args.device,
            "command": "python " + shlex.join(sys.argv)}


# ---------------------------------------------------------------- encoder
def encoder_config(args: argparse.Namespace, work: Path) -> DistillConfig:
    # lr, batch size, hidden-state matching and frozen word embeddings: the encoder defaults unless given.
    layer_map = [int(x) for x in args.encoder_layer_map.split(",")] if args.encoder_layer_map else None
    shape = dict(student_layers=None if layer_map else args.encoder_layers, layer_map=layer_map,
                 student_intermediate_size=args.encoder_intermediate_size)
    if args.encoder_student:  # a second schedule for a trained student: its directory fixes the shape
        shape = dict(student=str(args.encoder_student))
    return DistillConfig(target="encoder", **shape, intermediate_init=args.encoder_intermediate_init,
                         steps=args.encoder_steps,
                         batch_size=args.encoder_batch, seq_len=64,
                         lr=args.encoder_lr, warmup_steps=min(args.encoder_warmup, args.encoder_steps - 1),
                         temperature=2.0, embedding_weight=args.encoder_embedding_weight, hidden_weight=args.encoder_hidden_weight,
                         hidden_layers=args.encoder_hidden_layers, student_dropout=args.encoder_dropout,
                         eval_batches=8,
                         eval_every=args.encoder_eval_every, checkpoint_every=args.encoder_checkpoint_every,
                         out=str(work / "encoder_student"), repository=str(work / "models"),
                         name="sentiment_student", device=args.device, seed=0)


def finish_from_checkpoint(config: DistillConfig) -> dict:
    """A run stopped before its last step (a shared box's wall clock): the student of its newest checkpoint saved
    and exported as `distill` would, with the evaluations and history that checkpoint holds. The learning rate had
    not decayed there, so the quality is that of an unfinished schedule."""
    from tokenmill.distill.checkpoint import find_checkpoint, load_checkpoint
    from tokenmill.distill.encoder import EncoderTask

    path = find_checkpoint(config.checkpoint_root, "latest")
    state = load_checkpoint(path)
    task = EncoderTask(config)
    task.trainable().load_state_dict(state["trainable"])
    task.save_student(config.out_dir)
    report = task.export(config.out_dir, Path(config.repository), config.name)
    return {"config": config.to_dict(), "model": task.describe(), "evals": state["evals"],
            "history": state["history"], "seconds": round(sum(h["seconds"] for h in state["history"]), 1),
            "export": {"repository": config.repository, "model": report["model"],
                       "max_abs_vs_torch": report["validation"]["max_abs"], "atol": report["validation"]["atol"]},
            "stopped_at_step": state["step"], "checkpoint": str(path)}


def run_encoder(args: argparse.Namespace, work: Path) -> dict:
    record = header(args, "encoder")
    if args.encoder_student:
        record["starts_from"] = str(args.encoder_student)
    repository = work / "models"
    config = encoder_config(args, work)
    summary = finish_from_checkpoint(config) if args.encoder_from_checkpoint else distill(config)
    first, last = summary["evals"][0], summary["evals"][-1]
    if args.encoder_from_checkpoint:
        record.update(stopped_at_step=summary["stopped_at_step"], planned_steps=config.steps,
                      checkpoint=summary["checkpoint"])
    speed = {} if args.skip_speed else encoder_speed(args, repository / "sentiment_student" / "1" / "model.onnx",
                                                     work)
    record.update(
        distill_summary={k: summary[k] for k in ("config", "model", "evals", "seconds", "export")},
        history=summary["history"], quality={
            "teacher_accuracy": last["teacher_accuracy"], "student_accuracy": last["student_accuracy"],
            "student_accuracy_at_init": first["student_accuracy"],
            "accuracy_ratio": last["student_accuracy"] / last["teacher_accuracy"],
            "labelled_agreement": last["labelled_agreement"], "embedding_cosine": last["embedding_cosine"],
            "embedding_cosine_at_init": first["embedding_cosine"], "kl_to_teacher": last["kl_to_teacher"],
            "kl_to_teacher_at_init": first["kl_to_teacher"]},
        targets={"accuracy_ratio >= 0.97": last["student_accuracy"] / last["teacher_accuracy"] >= 0.97,
                 "embedding_cosine >= 0.95": last["embedding_cosine"] >= 0.95})
    if speed:
        record.update(speed_record(speed))
        record["targets"]["throughput >= 2.5x"] = record["speed_target_met"]
    return record


def encoder_speed(args: argparse.Namespace, student_onnx: Path, work: Path) -> dict:
    """ONNX Runtime CPU p50/p99/throughput of the teacher's graph and the student's, `bench-model`'s code."""
    from tokenmill.modelserver.bench_model import bench_model

    # Teacher and student alternate for --speed-rounds rounds, and each figure is the median over rounds: on a
    # shared box the load moves between back-to-back measurements.
    rounds: dict[str, list[dict]] = {"teacher": [], "student": []}
    for _ in range(args.speed_rounds):
        for name, model in (("teacher", "sentiment"), ("student", str(student_onnx))):
            report = bench_model(model, ("onnxruntime",), "cpu", args.batch_sizes, seq_len=64,
                                 iterations=args.iterations, warmup=3, onnx_dir=work / "onnx")
            rounds[name].append({r["batch_size"]: r for r in report["results"]})
    return {name: {b: {k: statistics.median(r[b][k] for r in runs) for k in ("p50_ms", "p99_ms", "throughput_per_s")}
                   | {"throughput_per_s_rounds": [r[b]["throughput_per_s"] for r in runs]}
                   for b in args.batch_sizes} for name, runs in rounds.items()}


def speed_record(speed: dict) -> dict:
    speedup = {b: speed["student"][b]["throughput_per_s"] / speed["teacher"][b]["throughput_per_s"]
               for b in speed["teacher"]}
    # Each round times the teacher then the student back to back, so a round's ratio sees one load; the median
    # of those ratios resists a load that moves between rounds better than the ratio of the two medians.
    paired = {b: statistics.median(s / t for s, t in zip(speed["student"][b]["throughput_per_s_rounds"],
                                                          speed["teacher"][b]["throughput_per_s_rounds"], strict=True))
              for b in speed["teacher"]}
    # bench-model's synthetic feeds: the same seeded ids for both graphs (same input names), every token real
    inputs = {"seq_len": 64, "input_ids": "seeded random ids in [1000, 20000), identical for teacher and student",
              "attention_mask": "all ones", "onnxruntime": "CPU, bench-model's OrtBackend (spinning, one caller)"}
    return {"speed": speed, "speed_inputs": inputs, "speedup": speedup, "speedup_paired_rounds_median": paired,
            "speed_target_met": all(v >= 2.5 for v in speedup.values()),
            "speed_target_met_paired": all(v >= 2.5 for v in paired.values())}


def with_training_record(path: Path, speed: dict) -> dict:
    """The training run's result JSON (its quality, evaluations, loss history, command) joined to a later timing of
    the same student, so one record holds all three encoder targets."""
    trained = json.loads(path.read_text())
    targets = dict(trained["targets"], **{"throughput >= 2.5x": speed["speed_target_met"]})
    return {"trained_by": trained["command"], "training_result": path.name, "targets": targets,
            "training_load_average": [trained["load_average_start"], trained["load_average_end"]],
            **{k: trained[k] for k in ("distill_summary", "history", "quality")}}


# ---------------------------------------------------------------- draft
def greedy_tokens_per_s(model, prompts: list[torch.Tensor], max_new: int) -> tuple[float, list[list[int]]]:
    model.generate(prompts[0], max_new_tokens=2, do_sample=False)  # warm-up: first-call costs are not decode speed
    outputs, tokens, seconds = [], 0, 0.0
    for ids in prompts:
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        seconds += time.perf_counter() - started
        outputs.append(out[0, ids.shape[1]:].tolist())
        tokens += out.shape[1] - ids.shape[1]
    return tokens / seconds, outputs


class OnlyIds:
    """A transformers logits processor: every id outside ``allowed`` gets -inf (a reduced draft vocabulary)."""

    def __init__(self, allowed: torch.Tensor) -> None:
        self.allowed = allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.allowed] = scores[:, self.allowed]
        return masked


def round_tokens(matches: list[bool], k: int, remaining: int) -> int:
    """Tokens one greedy speculative round emits: the draft's leading matches with the target (at most k) plus the
    target's own next token, within the ``remaining`` tokens of the answer."""
    accepted = 0
    while accepted < min(k, remaining) and matches[accepted]:
        accepted += 1
    return min(accepted + 1, remaining)


@torch.no_grad()
def acceptance_lengths(draft, prompts: list[torch.Tensor], continuations: list[list[int]], k: int,
                       allowed: torch.Tensor | None = None) -> list[int]:
    """Greedy speculative decoding replayed exactly: at each round the draft proposes k greedy tokens after the
    accepted prefix; the target (whose greedy output is ``continuation``) keeps the agreeing prefix and adds
    one token of its own. Returns tokens emitted per round (1..k+1). ``allowed``: the draft's reduced vocabulary
    (its argmax among those ids, as tokenmill's draft proposer takes it)."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([OnlyIds(allowed)] if allowed is not None else [])
    lengths = []
    for ids, continuation in zip(prompts, continuations, strict=True):
        done = 0
        while done < len(continuation):
            prefix = torch.cat([ids, torch.tensor([continuation[:done]], dtype=ids.dtype)], dim=1)
            proposal = draft.generate(prefix, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                      logits_processor=processors)[0, prefix.shape[1]:]
            remaining = len(continuation) - done
            emitted = round_tokens([int(proposal[i]) == continuation[done + i] for i in range(min(k, remaining))], k,
                                   remaining)
            lengths.append(emitted)
            done += emitted
    return lengths


@torch.no_grad()
def continuation_agreement(draft, prompts: list[torch.Tensor], continuations: list[list[int]]) -> list[float]:
    """Per prompt: the share of the target's own greedy continuation the draft predicts (teacher-forced argmax
    agreement). Greedy acceptance is a function of exactly these hits (a round stops at the first miss), so this is
    the held-out agreement that matters for the prompts the acceptance is measured on."""
    shares = []
    for ids, continuation in zip(prompts, continuations, strict=True):
        full = torch.cat([ids, torch.tensor([continuation], dtype=ids.dtype)], dim=1)
        guesses = draft(full).logits[0, ids.shape[1] - 1 : -1].argmax(-1)
        shares.append((guesses == torch.tensor(continuation)).float().mean().item())
    return shares


def assisted_seconds(teacher, draft, prompts: list[torch.Tensor], max_new: int, k: int,
                     expected: list[list[int]]) -> float:
    """Wall time of transformers' assisted generation (draft as assistant_model, k tokens a round, constant)."""
    seconds = 0.0
    for ids, reference in zip(prompts, expected, strict=True):
        started = time.perf_counter()
        out = teacher.generate(ids, assistant_model=draft, max_new_tokens=max_new, min_new_tokens=max_new,
                               do_sample=False, num_assistant_tokens=k, num_assistant_tokens_schedule="constant")
        seconds += time.perf_counter() - started
        if out[0, ids.shape[1]:].tolist() != reference:  # greedy speculative decoding must not change the output
            raise RuntimeError("assisted generation changed the teacher's greedy output")
    return seconds


def run_draft(args: argparse.Namespace, work: Path) -> dict:
    record = header(args, "draft")
    out = work / "draft_student"
    config = DistillConfig(target="draft", student_layers=args.draft_layers, steps=args.draft_steps,
                           batch_size=args.draft_batch, seq_len=args.draft_seq_len, lr=args.draft_lr,
                           warmup_steps=min(2, args.draft_steps - 1), temperature=1.0, eval_batches=2, checkpoint_every=0, out=str(out),
                           device=args.device, seed=0)
    summary = distill(config)
    record.update(distill_summary={k: summary[k] for k in ("config", "model", "evals", "seconds")},
                  history=summary["history"])
    return measure_draft(args, out, summary, record)


def chat_prompt_ids(tokenizer, count: int) -> list[torch.Tensor]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in CHAT_PROMPTS[:count]]
    return [tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"] for text in texts]


def measure_draft(args: argparse.Namespace, out: Path, summary: dict, record: dict) -> dict:
    from transformers import AutoModelForCausalLM

    from tokenmill.distill.llm import load_teacher
    from tokenmill.spec_decode.draft_vocab import load_draft_vocab

    teacher, tokenizer, _ = load_teacher(None)
    student = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for model in (teacher, student):
        model.generation_config.pad_token_id = tokenizer.eos_token_id
    prompts = chat_prompt_ids(tokenizer, args.prompts)
    teacher_tps, continuations = greedy_tokens_per_s(teacher, prompts, args.max_new)
    student_tps, _ = greedy_tokens_per_s(student, prompts, args.max_new)
    lengths = acceptance_lengths(student, prompts, continuations, args.k)
    agreement = continuation_agreement(student, prompts, continuations)
    vocab_ids = load_draft_vocab(out, student.config.vocab_size)
    subset = {}
    if vocab_ids is not None:  # the draft's reduced vocabulary (draft_vocab.json): what tokenmill's proposer does
        subset_lengths = acceptance_lengths(student, prompts, continuations, args.k, vocab_ids)
        subset = {"draft_vocab_size": vocab_ids.numel(),
                  "mean_acceptance_length_draft_vocab": sum(subset_lengths) / len(subset_lengths)}
    plain_seconds = args.prompts * args.max_new / teacher_tps
    spec_seconds = assisted_seconds(teacher, student, prompts, args.max_new, args.k, continuations)
    first, last = summary["evals"][0], summary["evals"][-1]
    record.update(
        quality={"teacher_perplexity": last["teacher_perplexity"], "student_perplexity": last["student_perplexity"],
                 "student_perplexity_at_init": first["student_perplexity"],
                 "kl_to_teacher": last["kl_to_teacher"], "kl_to_teacher_at_init": first["kl_to_teacher"],
                 "top1_agreement": last["top1_agreement"], "top1_agreement_at_init": first["top1_agreement"],
                 "held_out": "teacher answers to held-out prompts" if "text_kl_to_teacher" in last
                 else "held-out text",
                 # with --teacher-generated the unprefixed metrics are on held-out answers; these on held-out text
                 **{k: v for k, v in last.items() if k.startswith("text_")}},
        speed={"teacher_tokens_per_s": teacher_tps, "student_tokens_per_s": student_tps,
               "student_vs_teacher": student_tps / teacher_tps},
        speculative={"k": args.k, "prompts": len(prompts), "max_new_tokens": args.max_new,
                     "mean_acceptance_length": sum(lengths) / len(lengths), "rounds": len(lengths),
                     "top1_agreement_on_target_continuations": sum(agreement) / len(agreement),
                     "top1_agreement_per_prompt": [round(a, 3) for a in agreement],
                     "assisted_generation_seconds": spec_seconds, "teacher_alone_seconds": plain_seconds,
                     "end_to_end_speedup": plain_seconds / spec_seconds, **subset,
                     "how": "exact replay of greedy speculative decoding for the acceptance length; transformers "
                            "assisted generation (assistant_model, constant k) for wall time, outputs checked "
                            "equal to the teacher's greedy tokens"},
        targets={"mean_acceptance_length >= 2.0": sum(lengths) / len(lengths) >= 2.0,
                 "end_to_end_speedup > 1": plain_seconds / spec_seconds > 1.0})
    return record


# ---------------------------------------------------------------- output
def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    history = record["history"]
    evals = record["distill_summary"]["evals"]
    axes[0].plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="training loss")
    axes[0].plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", label="held-out loss")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    q = record["quality"]
    if record["benchmark"] == "distill_encoder":
        names = ["teacher acc", "student acc (init)", "student acc", "agreement", "cosine (init)", "cosine"]
        values = [q["teacher_accuracy"], q["student_accuracy_at_init"], q["student_accuracy"],
                  q["labelled_agreement"], q["embedding_cosine_at_init"], q["embedding_cosine"]]
        axes[1].bar(names, values, color=["gray", "lightblue", "tab:blue", "tab:green", "moccasin", "tab:orange"])
        axes[1].set(ylim=(0, 1.05), title="held-out quality")
        if "speed" in record:  # absent when trained with --skip-speed (timed later on a quiet box)
            batches = list(record["speed"]["teacher"])
            width = 0.38
            xs = range(len(batches))
            axes[2].bar([x - width / 2 for x in xs], [record["speed"]["teacher"][b]["throughput_per_s"]
                                                      for b in batches], width, label="teacher (6 layers)", color="gray")
            axes[2].bar([x + width / 2 for x in xs], [record["speed"]["student"][b]["throughput_per_s"]
                                                      for b in batches], width, label="student", color="tab:blue")
            axes[2].set_xticks(list(xs), [f"batch {b}" for b in batches])
            axes[2].set(ylabel="sentences/s (ONNX Runtime CPU)", title="throughput")
            axes[2].legend()
        else:
            evals = record["distill_summary"]["evals"]
            axes[2].plot([e["step"] for e in evals], [e["embedding_cosine"] for e in evals], "o-",
                         label="embedding cosine")
            axes[2].plot([e["step"] for e in evals], [e["student_accuracy"] / e["teacher_accuracy"] for e in evals],
                         "s-", label="accuracy ratio")
            axes[2].set(xlabel="step", title="held-out during training")
            axes[2].legend()
    else:
        names = ["teacher ppl", "student ppl", "KL init", "KL", "top-1 agree x100"]
        values = [q["teacher_perplexity"], q["student_perplexity"], q["kl_to_teacher_at_init"], q["kl_to_teacher"],
                  100 * q["top1_agreement"]]
        axes[1].bar(names, values, color=["gray", "tab:blue", "moccasin", "tab:orange", "tab:green"])
        axes[1].set(yscale="log", title="held-out quality (log scale)")
        s, sp = record["speed"], record["speculative"]
        axes[2].bar(["teacher tok/s", "student tok/s", f"accept len (k={sp['k']})", "spec speedup x10"],
                    [s["teacher_tokens_per_s"], s["student_tokens_per_s"], sp["mean_acceptance_length"],
                     10 * sp["end_to_end_speedup"]], color=["gray", "tab:blue", "tab:green", "tab:purple"])
        axes[2].set(title="batch-1 speed (CPU)")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"{record['benchmark']} ({record['date']}, {record['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="encoder,draft")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/tokenmill-distill-bench"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--encoder-steps", type=int, default=40)
    parser.add_argument("--encoder-layers", type=int, default=2)
    parser.add_argument("--encoder-layer-map", default=None, help="e.g. 0,4,5 (sets the student's depth)")
    parser.add_argument("--encoder-intermediate-size", type=int, default=None,
                        help="the student's FFN width (default: the teacher's 1536)")
    parser.add_argument("--encoder-intermediate-init", default="norm", choices=("norm", "first"))
    parser.add_argument("--encoder-student", type=Path, default=None,
                        help="continue a trained student directory (a fresh schedule) instead of building one; "
                             "--encoder-layer-map/--encoder-intermediate-size then only name the result file")
    parser.add_argument("--encoder-embedding-weight", type=float, default=1.0,
                        help="weight of 1 - pooled cosine to the teacher")
    parser.add_argument("--encoder-batch", type=int, default=None, help="default: the encoder target's")
    parser.add_argument("--encoder-lr", type=float, default=None, help="default: the encoder target's")
    parser.add_argument("--encoder-warmup", type=int, default=4)
    parser.add_argument("--encoder-hidden-weight", type=float, default=None, help="default: the encoder target's")
    parser.add_argument("--encoder-hidden-layers", default=None, help="default: the encoder target's")
    parser.add_argument("--encoder-dropout", type=float, default=0.0, help="the student's dropout while training")
    parser.add_argument("--encoder-eval-every", type=int, default=0)
    parser.add_argument("--encoder-checkpoint-every", type=int, default=0)
    parser.add_argument("--encoder-from-checkpoint", action="store_true",
                        help="the same arguments as a run that was stopped: export and report its newest checkpoint")
    parser.add_argument("--skip-speed", action="store_true",
                        help="encoder: train and measure quality only (time a loaded box's student later with "
                             "--measure-encoder)")
    parser.add_argument("--measure-encoder", type=Path, default=None,
                        help="skip training: time an exported student (its model.onnx) against the teacher; "
                             "--encoder-layers/--encoder-layer-map name the result file")
    parser.add_argument("--quality-from", type=Path, default=None,
                        help="with --measure-encoder: the training run's result JSON, whose quality and history "
                             "join the timing in one record")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--speed-rounds", type=int, default=1, help="encoder: alternate teacher/student timings")
    parser.add_argument("--draft-steps", type=int, default=20)
    parser.add_argument("--draft-layers", type=int, default=6)
    parser.add_argument("--draft-batch", type=int, default=4)
    parser.add_argument("--draft-seq-len", type=int, default=64)
    parser.add_argument("--draft-lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per speculative round")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (on a CPU shared with other jobs, 1 thread decodes batch 1 far faster)")
    parser.add_argument("--measure-draft", type=Path, default=None,
                        help="skip training: measure an existing draft student directory written by distill")
    parser.add_argument("--write-draft-vocab", type=int, default=None, metavar="N",
                        help="with --measure-draft: first write DIR's reduced draft vocabulary (draft_vocab.json, N "
                             "ids) from the teacher answers it trained on (--answers, --answers-prompts)")
    parser.add_argument("--answers", type=Path, default=None, help="the teacher_generated.jsonl the draft trained on")
    parser.add_argument("--answers-prompts", type=int, default=None, help="its --teacher-generated N")
    parser.add_argument("--answers-seq-len", type=int, default=192, help="its --seq-len")
    args = parser.parse_args()
    if args.write_draft_vocab is not None:
        if args.measure_draft is None or args.answers is None or args.answers_prompts is None:
            parser.error("--write-draft-vocab needs --measure-draft DIR, --answers FILE and --answers-prompts N")
        from tokenmill.distill.llm import draft_vocab_from_answers

        path = draft_vocab_from_answers(args.measure_draft, args.answers, args.answers_prompts, args.answers_seq_len,
                                        args.write_draft_vocab)
        print(f"wrote {path} (draft_vocab_size {args.write_draft_vocab})")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d_%H%M")
    for target in args.targets.split(","):
        work = args.work_dir / target
        started = time.perf_counter()
        if target == "encoder" and args.measure_encoder:
            record = dict(header(args, "encoder"), measured_student=str(args.measure_encoder),
                          **speed_record(encoder_speed(args, args.measure_encoder, work)))
            if args.quality_from:
                record.update(with_training_record(args.quality_from, record))
        elif target == "draft" and args.measure_draft:
            summary = json.loads((args.measure_draft / "distill_summary.json").read_text())
            record = dict(header(args, "draft"), history=summary["history"], distill_summary={
                k: summary[k] for k in ("config", "model", "evals", "seconds")}, measured_student=str(args.measure_draft))
            record = measure_draft(args, args.measure_draft, summary, record)
        else:
            record = run_encoder(args, work) if target == "encoder" else run_draft(args, work)
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        record["load_average_end"] = os.getloadavg()
        kind = ""
        if target == "encoder":  # two students (2 and 3 layers) started in one minute must not overwrite each other
            depth = len(args.encoder_layer_map.split(",")) if args.encoder_layer_map else args.encoder_layers
            kind = f"_l{depth}" + (f"_i{args.encoder_intermediate_size}" if args.encoder_intermediate_size else "")
            kind += "_continued" if args.encoder_student and "measured_student" not in record else ""
            kind += "_speed" if "measured_student" in record else ""
        path = args.results / f"distill_{target}{kind}_{stamp}.json"
        path.write_text(json.dumps(record, indent=2))
        if "history" in record:
            plot(record, path.with_suffix(".png"))
        print(json.dumps({k: record[k] for k in ("quality", "speed", "targets", "wall_seconds")
                          if k in record} | ({"speculative": record["speculative"]} if "speculative" in record
                                             else {"speedup": record.get("speedup")}), indent=2))
        print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
