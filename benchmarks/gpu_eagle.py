"""Issue 24's EAGLE-1 head for SmolLM2 on an H100 (``gpu_distill.py --job eagle`` runs ``eagle_job``, ``--restore``
calls ``restore_eagle``): ~10x the CPU box's teacher answers, their features, a longer bf16 run with the unrolled
loss, measured there; the head's trained tensors come back in fp16 and are rebuilt into a head directory here.

Every phase ends at its share of ``seconds`` counted from the job's start, loads included (``PHASE_ENDS``), so the
device call ends on time; the JSON is rewritten after each phase, and the head's tensors are written before the
evaluation starts.
 1. prompts: the teacher writes user turns itself (``teacher_data.self_prompts`` steered by SELF_PROMPT_OPENINGS,
    seeds far from the CPU runs'; none near an evaluation prompt) in tokenmill's engine (fp32, eager).
 2. answers: the same engine's greedy answers (96 tokens at most, as sessions 17/18) to the held-out prompts
    (session 18's: kinds prompts 1,193-1,325), then the training prompts (the other kinds prompts, the bundled ones,
    the self-written ones), then sampled passes (T = 0.8) over them while time lasts.
 3. features: the transformers teacher (the dequantized GGUF in fp32; TF32 matmuls for training sequences, plain
    fp32 for the held-out ones) over prompt + answer, in length-sorted batches (``eagle_data.batched_features``).
 4. training: ``tokenmill distill --target eagle``'s task (``distill.eagle.EagleTask``, the recipe its defaults hold:
    unroll 2, token weight 1, prompt positions) on these features, in the shared loop (``distill.trainer``, bf16
    autocast), its step count sized to the phase's time (``gpu_distill.train_for``).
 5. eval, of the fp16-rounded head that comes back: held-out agreement and batched acceptance at k = 2..5
    (``eagle_train.draft_acceptance``), checked against ``eagle_reference.replay`` on some held-out answers, then
    the reference loop (``eagle_reference.speculative_greedy``, asserted token-identical to plain greedy) on
    spec_decode_cpu.py's three chat prompts, on the device's CPU as on the CPU box.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import time
from pathlib import Path

import torch
from gpu_distill import (  # benchmarks/ is on sys.path
    ROOT,
    SAMPLE_TEMPERATURE,
    Record,
    device_name,
    prompt_ids,
    train_for,
)

PHASES = ("prompts", "answers", "features", "training", "eval")
PHASE_ENDS = (0.15, 0.42, 0.50, 0.86, 1.0)  # of the job's seconds: where each phase must have stopped
KINDS = ROOT / "benchmarks" / "results" / "distill_kinds_prompts_2026-12-07.txt"
HELD_OUT = slice(1193, 1326)  # session 18's held-out answers: the last 133 of session 17's 1,326 kinds prompts
SELF_PROMPT_SEED = 50_000_000  # the CPU runs' self-prompt seeds start at 0 and 100,000
HEAD_TENSORS = "eagle_head_0.safetensors"
HEAD_CONFIG = "eagle_config.json"
HEAD_VOCAB = "eagle_draft_vocab.json"
JSON_NAME = "gpu_distill_eagle.json"
GPU_ENGINE = {"max_num_seqs": 1024, "max_model_len": 512, "max_num_batched_tokens": 8192,  # prefill 2,048 prompts fast
              "gpu_memory_utilization": 0.4, "enforce_eager": True}
# DistillConfig fields of ``--target eagle`` (its defaults are this run's recipe) for the device: bigger batches; the
# step count is sized to the phase's time by gpu_distill.train_for
TRAIN_DEFAULTS = {"steps": 1_000_000, "batch_size": 128, "warmup_steps": 50, "eval_every": 250}


class Clock:
    """The job's phases' end times (``time.time()``), shares of one budget."""

    def __init__(self, seconds: float, ends: tuple[float, ...] = PHASE_ENDS) -> None:
        if len(ends) != len(PHASES) or list(ends) != sorted(ends) or ends[-1] > 1:
            raise ValueError(f"phase ends must be {len(PHASES)} rising shares of --seconds up to 1; got {ends}")
        self.start, self.seconds, self.ends = time.time(), seconds, ends

    def end(self, phase: str) -> float:
        return self.start + self.seconds * self.ends[PHASES.index(phase)]

    def left(self, phase: str) -> float:
        return self.end(phase) - time.time()

    def prompts_end(self) -> float:
        """When self-prompting must stop: the prompt phase's share of the generation window (prompts + answers)
        still left, so an engine start-up longer than the phase's fixed end (59 s of the 40 s on the H100,
        2026-12-07: no prompt got written) does not skip it."""
        now = time.time()
        share = self.ends[0] / self.ends[1]
        return max(self.end("prompts"), now + share * max(0.0, self.end("answers") - now))


def default_prompts() -> tuple[list[str], list[str]]:
    """(held-out, training): session 18's held-out kinds prompts; every other kinds prompt, then the bundled ones."""
    from tokenmill.distill.teacher_data import bundled_prompts

    kinds = [line.strip() for line in KINDS.read_text().splitlines() if line.strip()]
    return kinds[HELD_OUT], kinds[: HELD_OUT.start] + kinds[HELD_OUT.stop :] + bundled_prompts()


def evaluation_prompts() -> list[str]:
    from distill_cpu import CHAT_PROMPTS
    from distill_self_prompts import ENGINE_CHAT_PROMPTS

    return CHAT_PROMPTS + ENGINE_CHAT_PROMPTS


def training_prompts(candidates: list[str], held: list[str], near: list[str]) -> tuple[list[str], int]:
    """``candidates`` without repeats (case and spacing aside), held-out prompts, and any too close to one of
    ``near`` (``distill_self_prompts.near_benchmark``); and how many were dropped."""
    from distill_self_prompts import near_benchmark

    seen = {" ".join(p.lower().split()) for p in held}
    kept = []
    for prompt in candidates:
        flat = " ".join(prompt.lower().split())
        if flat not in seen and not near_benchmark(prompt, near):
            seen.add(flat)
            kept.append(prompt)
    return kept, len(candidates) - len(kept)


def answer(llm, tokenizer, prompts: list[str], temperature: float, seed: int, max_tokens: int) -> list[dict]:
    from tokenmill import SamplingParams

    ids = [prompt_ids(tokenizer, p) for p in prompts]
    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens,
                             seed=None if temperature == 0 else seed + i) for i in range(len(prompts))]
    outputs = llm.generate(ids, params, use_tqdm=False)
    return [{"prompt": p, "prompt_ids": i, "output_ids": list(o.outputs[0].token_ids), "temperature": temperature}
            for p, i, o in zip(prompts, ids, outputs, strict=True)]


def teacher_answers(llm, held: list[str], train: list[str], end: float, chunk: int, max_tokens: int, samples: int,
                    log=print) -> tuple[list[dict], list[dict], dict]:
    """Greedy answers to every held-out prompt (always), then to the training prompts, then sampled passes over
    them, ``chunk`` prompts a call; after the first, no chunk starts that the last one's time says would end after
    ``end``."""
    tokenizer = llm.get_tokenizer()
    started = time.time()
    held_records = answer(llm, tokenizer, held, 0.0, 0, max_tokens)
    records: list[dict] = []
    last = time.time() - started
    passes = [(0.0, 0)] + [(SAMPLE_TEMPERATURE, 1_000_003 * (s + 1)) for s in range(samples)]
    for temperature, seed in passes:
        for lo in range(0, len(train), chunk):
            if records and time.time() + last > end:  # one chunk at least: the head needs something to learn
                break
            t0 = time.time()
            records += answer(llm, tokenizer, train[lo : lo + chunk], temperature, seed + lo, max_tokens)
            last = time.time() - t0
            log(f"answers: {len(records)} ({temperature=}), {time.time() - started:.0f} s")
        else:
            continue
        break
    seconds = time.time() - started
    tokens = sum(len(r["output_ids"]) for r in records + held_records)
    stats = {"held_out_answers": len(held_records), "training_answers": len(records),
             "greedy_training_answers": sum(r["temperature"] == 0 for r in records),
             "training_prompts": len(train), "answer_tokens": tokens, "seconds": round(seconds, 1),
             "tokens_per_s": round(tokens / seconds, 1), "max_tokens": max_tokens, "chunk": chunk}
    return records, held_records, stats


def save_head(head, out: Path, head_dir: Path) -> list[str]:
    """The head's own tensors (fc + the layer; the final norm, embedding and LM head are the teacher's) in fp16,
    with its config and draft vocabulary; the head keeps the fp16-rounded values, so what is measured next is
    what comes back."""
    from safetensors.torch import save_file

    with torch.no_grad():
        for parameter in head.parameters():
            parameter.copy_(parameter.half().float())
    tensors = {k: v.half().contiguous().cpu() for k, v in head.state_dict().items() if not k.startswith("norm.")}
    save_file(tensors, str(out / HEAD_TENSORS))
    shutil.copy2(head_dir / "config.json", out / HEAD_CONFIG)
    if (head_dir / "draft_vocab.json").is_file():
        shutil.copy2(head_dir / "draft_vocab.json", out / HEAD_VOCAB)
    return [HEAD_TENSORS, HEAD_CONFIG, HEAD_VOCAB]


def cpu_head(head, teacher_cpu):
    from tokenmill.distill.eagle_head import EagleHead

    copy_ = EagleHead(head.config, teacher_cpu.get_input_embeddings().weight, teacher_cpu.get_output_embeddings().weight)
    copy_.load_state_dict({k: v.cpu() for k, v in head.state_dict().items()})
    return copy_.eval()


def chat_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """eagle_cpu.py's chat prompt ids (so the figure compares with the CPU box's), plain ids without a template."""
    from eagle_cpu import chat_prompt_ids

    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, texts)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def eagle_job(teacher: str, out: Path, work: Path, device: str, seconds: float, held: list[str], train: list[str],
              chat: list[str], self_prompt_count: int = 0, samples: int = 6, max_tokens: int = 96,
              chat_max_tokens: int = 96, ks: tuple[int, ...] = (2, 3, 4, 5), draft_vocab_size: int | None = 4096,
              engine_args: dict | None = None, chunk: int | None = None, train_overrides: dict | None = None,
              phase_ends: tuple[float, ...] = PHASE_ENDS, replay_check: int = 10, log=print) -> dict:
    """The five phases (module docstring); returns the record also written to ``out/gpu_distill_eagle.json``."""
    from concurrent.futures import ThreadPoolExecutor

    from eagle_cpu import reference_runs

    from tokenmill import LLM
    from tokenmill.distill.config import DistillConfig
    from tokenmill.distill.eagle import EagleData, EagleTask
    from tokenmill.distill.eagle_data import batched_features
    from tokenmill.distill.eagle_train import draft_acceptance, teacher_forced_agreement
    from tokenmill.distill.llm import load_teacher
    from tokenmill.distill.teacher_data import SELF_PROMPT_OPENINGS, self_prompts
    from tokenmill.spec_decode.draft_vocab import load_draft_vocab
    from tokenmill.spec_decode.eagle_reference import replay

    clock = Clock(seconds, phase_ends)
    cuda = device.startswith("cuda")
    record = Record(out / JSON_NAME, "eagle", device_name(device))
    record.data.update(seconds_budget=seconds, phase_ends=dict(zip(PHASES, phase_ends, strict=True)))
    # the transformers teacher dequantizes on the CPU while the engine generates
    loading = ThreadPoolExecutor(1).submit(load_teacher, teacher)
    engine_args = engine_args if engine_args is not None else (GPU_ENGINE if cuda else {"max_num_seqs": 16})
    chunk = chunk or (2048 if cuda else 16)
    llm = LLM(teacher, dtype="float32", **engine_args)
    near = evaluation_prompts() + held + chat
    written: list[str] = []
    if self_prompt_count:
        t0 = time.time()
        written = self_prompts(None, self_prompt_count, seed=SELF_PROMPT_SEED, batch_size=chunk, llm=llm,
                               deadline=clock.prompts_end(), openings=SELF_PROMPT_OPENINGS, log=lambda _: None)
        log(f"{len(written)} self-written prompts in {time.time() - t0:.1f} s")
    prompts, dropped = training_prompts(train + written, held, near)
    record.update("prompts", prompts={"self_written": len(written), "given": len(train), "training": len(prompts),
                                      "dropped_repeats_or_near_evaluation": dropped, "held_out": len(held),
                                      "engine_args": engine_args, "seconds_from_start": round(time.time() -
                                                                                             clock.start, 1)})
    records, held_records, stats = teacher_answers(llm, held, prompts, clock.end("answers"), chunk, max_tokens,
                                                   samples, log)
    del llm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    record.update("answers", answers={**stats, "seconds_from_start": round(time.time() - clock.start, 1)})

    teacher_cpu, tokenizer, source = loading.result()
    teacher_dev = copy.deepcopy(teacher_cpu).to(device) if cuda else teacher_cpu
    held_set, _, held_check = batched_features(teacher_dev, held_records, device, None, 32_768, tf32=False)
    train_set, _, train_check = batched_features(teacher_dev, records, device, clock.end("features"), 65_536, tf32=True)
    record.update("features", teacher=source, features={"held_out": held_check, "training": train_check,
                                                        "seconds_from_start": round(time.time() - clock.start, 1)})

    config = DistillConfig(**{"target": "eagle", "teacher": teacher, "out": str(work / "eagle_train"),
                              "device": device, "bf16": cuda, "draft_vocab_size": draft_vocab_size,
                              "checkpoint_every": 0, "progress": False, **TRAIN_DEFAULTS, **(train_overrides or {})})
    data = EagleData(teacher_cpu, source, train_set, held_set,
                     f"{len(train_set)} teacher answers (greedy + sampled) to training prompts; greedy answers to "
                     f"{len(held_set)} held-out prompts", {"train": train_check, "held_out": held_check})
    task = EagleTask(config, data)  # the head: EagleHead.from_target, on the device
    summary = train_for(task, config, max(1.0, clock.left("training")), log=log)
    head = task.head
    head_dir = work / "eagle_head"
    task.save_student(head_dir)  # config.json, model.safetensors, draft_vocab.json (the training answers' ranking)
    rows_ids = load_draft_vocab(head_dir, teacher_cpu.config.vocab_size)
    rows_dev = None if rows_ids is None else rows_ids.to(device)
    steps = summary["history"]
    record.update("training", training={
        "config": summary["config"], "evals": summary["evals"], "seconds": summary["seconds"],
        "steps_done": summary["steps_done"], "planned_steps": summary["planned_steps"],
        "sequences_seen": summary["steps_done"] * config.batch_size * config.grad_accum,
        "epochs": round(summary["steps_done"] * config.batch_size * config.grad_accum / max(1, len(train_set)), 2),
        "losses_every_20": steps[19::20], "final_losses": steps[-1] if steps else None})
    files = save_head(head, out, head_dir)
    record.update("saved", trained_files=files, draft_vocab_size=draft_vocab_size)

    head.eval()
    held_eval = {"sequences": len(held_set), **teacher_forced_agreement(head, held_set, rows_dev, 64),
                 "replay": draft_acceptance(head, held_set, list(ks), rows_dev, 64)}  # the figure: never cut short
    if rows_ids is not None:
        held_eval["replay_full_vocab_k4"] = draft_acceptance(head, held_set, [4], None, 64, clock.end("eval"))["k4"]
    record.update("held_out", held_out=held_eval)
    log(f"held-out: {json.dumps(held_eval)}")

    del teacher_dev
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    head_cpu = cpu_head(head, teacher_cpu)
    subset = held_set.subset(range(min(replay_check, len(held_set))))
    batched = draft_acceptance(head, subset, [4], rows_dev, 64)["k4"]
    subset_cpu = type(subset)(subset.ids.cpu(), subset.features.cpu(), subset.offsets.cpu(), subset.prompt_lens.cpu())
    lengths = [n for i in range(len(subset_cpu)) for n in replay(head_cpu, *subset_cpu.sequence(i), 4, rows_ids)]
    record.update("replay_check", replay_check={
        "sequences": len(subset_cpu), "batched_on_device_k4": batched,
        "eagle_reference_replay_cpu_k4": {"mean_acceptance_length": round(sum(lengths) / max(1, len(lengths)), 4),
                                          "rounds": len(lengths)}})
    order = [4] + [k for k in ks if k != 4]  # the target's k first: a deadline leaves out the others
    try:
        chat_eval = reference_runs(teacher_cpu, head_cpu, chat_ids(tokenizer, chat), order, rows_ids,
                                   chat_max_tokens, tokenizer.eos_token_id, deadline=clock.end("eval"))
        chat_eval["prompts"] = chat
    except AssertionError as exc:  # the head's output is never trusted over the target's: say so, loudly
        chat_eval = {"token_identical": False, "error": str(exc)}
    record.update("chat_prompts", chat_prompts=chat_eval, seconds=round(time.time() - clock.start, 1))
    log(f"chat prompts: {json.dumps(chat_eval)}")
    return record.data


def restore_eagle(results: Path, out: Path, teacher: str | None = None) -> dict:
    """The head directory ``EagleHead.load`` (and ``{"method": "eagle", "model": DIR}``) reads, from what came
    back: the teacher's final norm, embedding and LM head from ``teacher`` (default: the embedded SmolLM2)."""
    from safetensors.torch import load_file

    from tokenmill.distill.eagle_head import EagleHead
    from tokenmill.distill.llm import load_teacher

    record = json.loads((results / JSON_NAME).read_text())
    target, _, source = load_teacher(teacher)
    head = EagleHead.from_target(target)
    tensors = {k: v.float() for k, v in load_file(str(results / HEAD_TENSORS)).items()}
    state = head.state_dict()
    if set(tensors) != {k for k in state if not k.startswith("norm.")}:
        raise ValueError(f"{results / HEAD_TENSORS} does not hold the head's fc and layer tensors")
    head.load_state_dict({**state, **tensors})
    head.save(out, record.get("draft_vocab_size"))
    if (results / HEAD_VOCAB).is_file():
        shutil.copy2(results / HEAD_VOCAB, out / "draft_vocab.json")
    EagleHead.load(out, target.get_input_embeddings().weight, target.get_output_embeddings().weight)  # loads back
    return {"head_dir": str(out), "tensors": len(tensors), "teacher": source,
            "device_held_out": record.get("held_out"), "device_chat_prompts": record.get("chat_prompts")}
