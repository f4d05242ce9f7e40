"""Issue 24 on an H100: both distillation students (and SmolLM2's EAGLE head, ``--job eagle``: gpu_eagle.py) trained far
longer than the CPU box allows, measured there, and their trained tensors sent back (frozen embeddings and heads are
rebuilt from the teachers by ``--restore`` on the CPU box).

The teachers do not fit one device call (the working tree, carried folders included, is capped at 64 MiB): MiniLM
travels as fp16 tensors with only the word-embedding rows the distillation text uses; SmolLM2's 98 MB GGUF travels
byte-exact in two parts, in two calls made back to back on the same warm machine.

    # CPU box, repo root (5 s): .distill_carry_encoder/ (27 MiB), _llm1/ (48 MiB), _llm2/ (46 MiB), git-ignored;
    # --extra-text: more KJV books for the encoder (bible-kjv-text, not the held-out Ruth / Ecclesiastes)
    python benchmarks/gpu_distill.py --prepare .distill_carry --wheel-dir .whl --extra-text kjv_more.txt
    # device, call E (carry .distill_carry_encoder; ~105 s): the encoder student
    timeout 170 python3 benchmarks/gpu_distill.py --job encoder --out $OUT
    # device, call D1 (carry .distill_carry_llm1; seconds): only leaves part 1 of the GGUF on the machine
    ls -la .distill_carry_llm1
    # device, call D2 at once after D1 (carry .distill_carry_llm2; ~175 s): teacher answers, draft, acceptance
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .distill_carry_llm2/gguf-*.whl
    PYTHONPATH=/tmp/site timeout 250 python3 benchmarks/gpu_distill.py --job draft --out $OUT
    # ... or (~230 s) with 3,000 more prompts the teacher writes itself, steered to kinds of chat request (stories, tips,
    # explanations, ...; --self-prompt-openings none: plain Magpie) and kept away from the evaluation prompts
    PYTHONPATH=/tmp/site timeout 320 python3 benchmarks/gpu_distill.py --job draft --self-prompts 3000 --out $OUT
    # ... or, D2 for the EAGLE head instead (benchmarks/gpu_eagle.py; after the same D1; ~300 s of the call): the teacher
    # writes up to 30,000 prompts and answers them, features, bf16 training with the unrolled loss, measurement;
    # every phase ends at its share of --seconds from the job's start
    PYTHONPATH=/tmp/site timeout 320 python3 benchmarks/gpu_distill.py --job eagle --self-prompts 30000 \
        --seconds 270 --out $OUT
    # CPU box: rebuild the full student directories (and the EAGLE head's, OUT/eagle) from what came back (and export /
    # evaluate them)
    python benchmarks/gpu_distill.py --restore RESULTS_DIR --restore-out /tmp/distill_restored
    # CPU box, end to end with the real GGUF and tiny budgets (the eagle job's check before a device call)
    PYTHONPATH=. python benchmarks/gpu_distill.py --job eagle --device cpu --carry .distill_carry --seconds 200 \
        --phase-ends 0.3,0.55,0.65,0.8,1 --self-prompts 16 --max-prompts 24 --held-out 8 --samples 1 \
        --chat-max-tokens 12 --eagle-overrides '{"batch_size": 8}' --out /tmp/eagle_cpu_out
    # CPU box: continue a trained encoder student with the real teacher (stage 2 only)
    python benchmarks/gpu_distill.py --job encoder --device cpu --encoder-teacher MINILM_DIR --extra-text kjv_more.txt \
        --encoder-continue STUDENT_DIR --encoder-seconds 0,1500 --out OUT

Each job writes its JSON (date, device, command) as it goes, so a run stopped by its timeout still returns a record.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # tokenmill and distill_cpu.py without an install (device)

PART_BYTES = 48 * 2**20  # each GGUF part travels in its own call beside the ~11 MB working tree
MAX_OUT_FILE = 14 * 2**20  # $OUT files come back only below 16 MiB each
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
ENCODER_REST = "minilm_fp16.safetensors"
ENCODER_ROWS = "minilm_word_rows_fp16.safetensors"
ENCODER_LAYER_MAP = [0, 4, 5]
ENCODER_FFN = 768
EXTRA_TEXT = "extra_text.txt"  # more KJV books (prepare --extra-text): encoder training sentences beside the default
SAMPLE_TEMPERATURE = 0.8  # sampled answers: varied prefixes, still the teacher's own text


# ---------------------------------------------------------------- carry (CPU box)
def carry_dirs(prefix: str | Path) -> dict[str, Path]:
    prefix = str(prefix)
    return {"encoder": Path(f"{prefix}_encoder"), "llm1": Path(f"{prefix}_llm1"), "llm2": Path(f"{prefix}_llm2")}


def distill_text_ids(tokenizer_dir: Path, extra: Path | None = None) -> list[int]:
    """Every WordPiece id of the encoder's distillation text (training and held-out, untruncated: a superset of what
    the encoder job feeds the teacher) plus the special tokens."""
    from tokenizers import Tokenizer

    from tokenmill.distill.data import HELDOUT_TEXT, NARRATIVE_TEXT, TRAIN_TEXT, read_corpus
    from tokenmill.modelserver.train_head import load_rows

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    lines = []
    for path in (TRAIN_TEXT, NARRATIVE_TEXT, HELDOUT_TEXT):
        lines += [line for line in read_corpus(path).splitlines() if line.strip()]
    lines += [row["text"] for row in load_rows()]
    if extra is not None:
        lines += [line for line in read_corpus(extra).splitlines() if line.strip()]
    ids = {0, 100, 101, 102, 103}  # [PAD] [UNK] [CLS] [SEP] [MASK]
    for encoding in tokenizer.encode_batch(lines):
        ids.update(encoding.ids)
    return sorted(ids)


def write_encoder_carry(teacher_dir: Path, out: Path, ids: list[int] | None = None, extra: Path | None = None) -> dict:
    """fp16 MiniLM without the word-embedding rows no distillation text uses, plus its config and tokenizer (and
    ``extra`` training text, whose rows are kept too)."""
    from safetensors.torch import load_file, save_file

    from tokenmill.distill.encoder import ENCODER_TOKENIZER_FILES

    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(teacher_dir / "model.safetensors"))
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    ids = distill_text_ids(teacher_dir, extra) if ids is None else ids
    if extra is not None:
        shutil.copy2(extra, out / EXTRA_TEXT)
    index = torch.tensor(ids, dtype=torch.long)
    save_file({"ids": index, "rows": state[key][index].half().contiguous()}, str(out / ENCODER_ROWS),
              metadata={"key": key, "vocab_size": str(state[key].shape[0])})
    save_file({k: v.half().contiguous() for k, v in state.items() if k != key}, str(out / ENCODER_REST))
    for name in ("config.json", *ENCODER_TOKENIZER_FILES):
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    return {"rows_kept": len(ids), "rows_total": int(state[key].shape[0])}


def rebuild_encoder_teacher(carry: Path, out: Path) -> Path:
    """The carried MiniLM as an HF directory (fp32; word-embedding rows not carried are zero)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.float() for k, v in load_file(str(carry / ENCODER_REST)).items()}
    with safe_open(str(carry / ENCODER_ROWS), "pt") as f:
        meta = f.metadata()
        ids, rows = f.get_tensor("ids"), f.get_tensor("rows").float()
    table = torch.zeros(int(meta["vocab_size"]), rows.shape[1])
    table[ids] = rows
    state[meta["key"]] = table
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in carry.iterdir():
        if path.suffix != ".safetensors" and path.name != EXTRA_TEXT:
            shutil.copy2(path, out / path.name)
    return out


def split_file(path: Path, targets: list[Path], part_bytes: int = PART_BYTES) -> dict:
    """``path`` cut into consecutive parts (part i into targets[i]); the manifest names them and the whole's sha256."""
    data = path.read_bytes()
    parts = [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)]
    if len(parts) > len(targets):
        raise ValueError(f"{path} needs {len(parts)} parts of {part_bytes} bytes; only {len(targets)} carry folders")
    names = []
    for number, (part, target) in enumerate(zip(parts, targets, strict=False)):
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{path.name}.part{number}").write_bytes(part)
        names.append(f"{target.name}/{path.name}.part{number}")
    return {"name": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "parts": names}


def carried_gguf(dirs: dict[str, Path], work: Path) -> Path:
    """SmolLM2's GGUF, joined from the parts calls D1 and D2 carried."""
    return join_parts(dirs["llm2"].parent, json.loads((dirs["llm2"] / MANIFEST).read_text()), work / GGUF_NAME)


def join_parts(root: Path, manifest: dict, out: Path) -> Path:
    """The file the manifest describes, from its parts under ``root``; a missing part or a wrong hash stops here."""
    missing = [p for p in manifest["parts"] if not (root / p).is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: the machine that got call D1 was given back before D2 came. Make the "
                         "two calls again, D2 right after D1 returns (the machine stays warm for 30 s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with out.open("wb") as whole:
        for part in manifest["parts"]:
            data = (root / part).read_bytes()
            digest.update(data)
            whole.write(data)
    if digest.hexdigest() != manifest["sha256"]:
        raise SystemExit(f"{out} does not match the manifest's sha256: carry the parts again")
    return out


def prepare(prefix: Path, wheel_dir: Path, extra: Path | None = None) -> None:
    from tokenmill.model.loader import embedded_model_path
    from tokenmill.modelserver.bundled import minilm_dir

    dirs = carry_dirs(prefix)
    for path in dirs.values():
        shutil.rmtree(path, ignore_errors=True)
    kept = write_encoder_carry(minilm_dir(), dirs["encoder"], extra=extra)
    manifest = split_file(embedded_model_path(), [dirs["llm1"], dirs["llm2"]])
    wheels = sorted(wheel_dir.glob("gguf-*.whl"))
    if not wheels:
        raise SystemExit(f"no gguf wheel in {wheel_dir}: see benchmarks/fetch_gpu_wheels.sh, or pass --wheel-dir")
    shutil.copy2(wheels[-1], dirs["llm2"] / wheels[-1].name)
    (dirs["llm2"] / MANIFEST).write_text(json.dumps(manifest, indent=2))
    for name, path in dirs.items():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"{path}: {size / 2**20:.1f} MiB" + (f" (word-embedding rows {kept['rows_kept']}/{kept['rows_total']})"
                                                    if name == "encoder" else ""))


# ---------------------------------------------------------------- trained tensors out and back
def trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}


def save_trained(module: torch.nn.Module, out: Path, stem: str, dtype: torch.dtype) -> list[str]:
    """The trainable tensors of ``module`` in ``dtype``, split across safetensors files of at most MAX_OUT_FILE."""
    from safetensors.torch import save_file

    files, chunk, size = [], {}, 0
    tensors = {k: v.to(dtype).contiguous() for k, v in trained_state(module).items()}
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if chunk and size + nbytes > MAX_OUT_FILE:
            files.append(chunk)
            chunk, size = {}, 0
        chunk[name], size = tensor, size + nbytes
    files.append(chunk)
    names = []
    for number, chunk in enumerate(files):
        name = f"{stem}_{number}.safetensors"
        save_file(chunk, str(out / name))
        names.append(name)
    return names


def load_trained(module: torch.nn.Module, directory: Path, names: list[str]) -> int:
    """Trained tensors back into ``module`` (cast to its dtype); every trainable parameter must be among them."""
    from safetensors.torch import load_file

    tensors = {}
    for name in names:
        tensors.update(load_file(str(directory / name)))
    wanted = trained_state(module)
    if set(tensors) != set(wanted):
        raise ValueError(f"trained tensors do not match the student: missing {sorted(set(wanted) - set(tensors))[:5]}, "
                         f"unexpected {sorted(set(tensors) - set(wanted))[:5]}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return len(tensors)


# ---------------------------------------------------------------- shared job parts
class Record:
    """The job's JSON, rewritten after every phase."""

    def __init__(self, path: Path, job: str, device: str) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"benchmark": f"gpu_distill_{job}", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                     "device": device, "machine": platform.platform(), "torch": torch.__version__,
                     "command": "python3 " + shlex.join(sys.argv), "phases_done": []}

    def update(self, phase: str, **values) -> None:
        self.data.update(values)
        self.data["phases_done"].append(phase)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"


def train_for(task, config, seconds: float, log=print) -> dict:
    """Train ``task`` for ``config.steps`` or as many as fit ``seconds`` (the schedule is re-sized after 20 probe
    steps: the LR lambda reads ``config.steps``), with about four held-out evaluations; returns a summary like
    ``distill``'s."""
    from tokenmill.distill.trainer import Trainer

    trainer = Trainer(task, config)
    trainer.evaluate()
    planned, started = config.steps, time.perf_counter()
    warm = min(5, config.steps // 4)  # the first steps pay one-off costs (allocator, cuBLAS, autotuning)
    probe = min(warm + 20, config.steps - 1)
    warm_done = started
    while trainer.step < config.steps:
        trainer.train_step()
        if trainer.step == warm:
            warm_done = time.perf_counter()
        if trainer.step == probe and probe > warm:
            per_step = (time.perf_counter() - warm_done) / (probe - warm)
            left = seconds - (time.perf_counter() - started)
            config.steps = max(probe + 1, min(planned, probe + int(left / per_step)))
            config.warmup_steps = min(config.warmup_steps, config.steps // 10)
            config.eval_every = max(1, config.steps // 4)
            log(f"{per_step * 1e3:.1f} ms/step: {config.steps} steps fit {seconds:.0f} s (planned {planned})")
        elif config.eval_every and trainer.step % config.eval_every == 0 and trainer.step < config.steps:
            trainer.evaluate()
            log(f"step {trainer.step}: {json.dumps({k: round(v, 4) for k, v in trainer.evals[-1].items()})}")
    trainer.evaluate()
    log(f"final step {trainer.step}: {json.dumps({k: round(v, 4) for k, v in trainer.evals[-1].items()})}")
    return {"config": config.to_dict(), "model": task.describe(), "planned_steps": planned, "steps_done": trainer.step,
            "evals": trainer.evals, "history": trainer.history,
            "seconds": round(time.perf_counter() - started, 1)}


def curve(summary: dict, path: Path) -> str | None:
    from tokenmill.distill.run import plot_loss_curve

    return plot_loss_curve(summary, path)


# ---------------------------------------------------------------- encoder job
def encoder_config(teacher: str | None, head: str | None, out: Path, device: str, **overrides):
    from tokenmill.distill.config import DistillConfig

    values = dict(target="encoder", teacher=teacher, teacher_head=head, layer_map=ENCODER_LAYER_MAP,
                  student_intermediate_size=ENCODER_FFN, intermediate_init="norm", batch_size=128, seq_len=64,
                  lr=1e-3, warmup_steps=100, temperature=2.0, eval_batches=2, checkpoint_every=0, out=str(out),
                  device=device, progress=False, steps=100_000)
    values.update(overrides)
    return DistillConfig(**values)


def make_encoder_task(config, extra_sentences: list[str]):
    """An EncoderTask that also trains on ``extra_sentences`` (its held-out and labelled sets unchanged)."""
    from tokenmill.distill.encoder import EncoderTask

    class MoreTextEncoderTask(EncoderTask):
        def _load_data(self) -> None:
            super()._load_data()
            if extra_sentences:
                self.sentences = self.sentences + extra_sentences
                self.num_examples = len(self.sentences)
                self.data_source += f" + {len(extra_sentences)} sentences of {EXTRA_TEXT}"

    return MoreTextEncoderTask(config)


def encoder_job(teacher_dir: Path, head: Path, out: Path, work: Path, device: str, seconds: tuple[float, float],
                batch_sizes: list[int], iterations: int, overrides: dict | None = None,
                extra_sentences: list[str] | None = None, compile: bool = False,
                start_from: Path | None = None) -> dict:
    """Stage 1: the measured recipe (hidden-state + cosine + soft labels) for ``seconds[0]``; stage 2: the same
    student with the pooled cosine weighted 10x at a lower LR for ``seconds[1]``; then the torch backend timed.
    ``start_from``: a trained student directory; stage 1 is skipped and stage 2 continues it."""
    record = Record(out / "gpu_distill_encoder.json", "encoder", device_name(device))
    overrides = overrides or {}
    stage1 = None
    if start_from is None:
        config = encoder_config(str(teacher_dir), str(head), work / "stage1", device, **overrides)
        task = make_encoder_task(config, extra_sentences or [])
        stage1 = train_for(task, config, seconds[0])
        task.save_student(config.out_dir)
        start_from = config.out_dir
        record.update("stage1", stage1=stage1, stage1_curve=curve(stage1, out / "gpu_distill_encoder_stage1.png"))
    stage2_overrides = {"lr": 3e-4, "warmup_steps": 20, "embedding_weight": 10.0, **overrides, "layer_map": None,
                        "student_intermediate_size": None, "student_hidden_size": None, "student": str(start_from)}
    config2 = encoder_config(str(teacher_dir), str(head), work / "stage2", device, **stage2_overrides)
    task2 = make_encoder_task(config2, extra_sentences or [])
    stage2 = train_for(task2, config2, seconds[1])
    task2.save_student(config2.out_dir)
    files = save_trained(task2.student, out, "encoder_student", torch.float32)
    last, first = stage2["evals"][-1], (stage1 or stage2)["evals"][0]
    quality = {"teacher_accuracy": last["teacher_accuracy"], "student_accuracy": last["student_accuracy"],
               "accuracy_ratio": last["student_accuracy"] / last["teacher_accuracy"],
               "embedding_cosine": last["embedding_cosine"], "embedding_cosine_at_init": first["embedding_cosine"],
               "kl_to_teacher": last["kl_to_teacher"], "teacher": str(teacher_dir)}
    shape = task2.student.encoder.config  # restore rebuilds this shape (its layer start is overwritten anyway)
    record.update("stage2", stage2=stage2, stage2_curve=curve(stage2, out / "gpu_distill_encoder_stage2.png"),
                  trained_files=files, quality=quality, started_from=str(start_from),
                  student_shape={"layer_map": None, "student_layers": shape.num_hidden_layers,
                                 "student_intermediate_size": shape.intermediate_size, "student_hidden_size":
                                 shape.hidden_size if shape.hidden_size != task2.teacher.encoder.config.hidden_size
                                 else None})
    try:
        speed = encoder_speed(teacher_dir, config2.out_dir, head, device, batch_sizes, iterations, compile)
    except Exception as exc:  # the trained tensors are already written; say why the timing is missing
        speed = {"error": f"{type(exc).__name__}: {exc}"}
    record.update("speed", speed=speed)
    return record.data


def encoder_speed(teacher_dir: Path, student_dir: Path, head: Path, device: str, batch_sizes: list[int],
                  iterations: int, compile: bool = False) -> dict:
    """bench-model's torch backend (fp32; eager unless ``compile``: torch.compile + CUDA graphs, bench-model's
    default on CUDA, costs a minute of compiling per model on a device lent for minutes) on the teacher and the
    student, the same seeded ids (seq 64) for both."""
    from tokenmill.distill.encoder import HEAD_FILE
    from tokenmill.modelserver.backends import TorchBackend
    from tokenmill.modelserver.benchmark import measure, synthetic_feeds
    from tokenmill.modelserver.export import hf_export_spec

    results: dict = {}
    for name, directory, head_path in (("teacher", teacher_dir, head), ("student", student_dir, student_dir / HEAD_FILE)):
        spec = hf_export_spec(directory, head_path=head_path)
        inputs = {k: ([-1] * (t.dim() - 1) if t.dtype == torch.int64 else list(t.shape[1:]), t.numpy().dtype)
                  for k, t in spec.example_inputs.items()}
        backend = TorchBackend(spec.module, spec.output_names, device="cuda" if device.startswith("cuda") else "cpu",
                               compile=compile)
        results[name] = {}
        for batch in batch_sizes:
            feeds = synthetic_feeds(inputs, batch, 64)
            result = measure(lambda b=backend, f=feeds: b.run(f), batch, "torch", warmup=3, iterations=iterations)
            results[name][batch] = result.as_dict()
            print(f"{name}: {result.line()}", flush=True)
    speedup = {b: results["student"][b]["throughput_per_s"] / results["teacher"][b]["throughput_per_s"]
               for b in batch_sizes}
    return {"backend": f"torch (bench-model's TorchBackend, fp32, {'compiled' if compile else 'eager'})",
            "seq_len": 64, "results": results,
            "speedup": speedup}


# ---------------------------------------------------------------- draft job
def make_draft_task(config, train_records: list[dict], held_records: list[dict]):
    """A DraftTask whose teacher-generated data are the given records (greedy and sampled answers to training prompts;
    greedy answers to held-out prompts), not the --teacher-generated cache of one answer per prompt."""
    from tokenmill.distill.llm import DraftTask
    from tokenmill.distill.teacher_data import answer_batch

    class GeneratedDraftTask(DraftTask):
        def _load_teacher_answers(self) -> None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
            self.train_windows, self.train_mask = answer_batch(train_records, self.config.seq_len, pad)
            self.eval_sets["answers"] = answer_batch(held_records, self.config.seq_len, pad)
            self.answer_source = (f"{len(train_records)} teacher answers (greedy + sampled) to training prompts; "
                                  f"greedy answers to {len(held_records)} held-out prompts")

    return GeneratedDraftTask(config)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True))
    return tokenizer.encode(prompt)


def hf_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A transformers tokenizer's ids for ``prompt`` as distill_cpu.chat_prompt_ids builds them."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_records(teacher: str, prompts: list[str], held: int, samples: int, max_tokens: int, temperature: float,
                     seconds: float, engine_args: dict, log=print) -> tuple[list[dict], list[dict], dict]:
    """Greedy answers to every prompt, then sampled answers to the training prompts (all but the last ``held``), one
    pass over them at a time while ``seconds`` last. Returns (training records, held-out records, stats)."""
    from tokenmill import LLM, SamplingParams

    started = time.perf_counter()
    engines = [LLM(teacher, dtype="float32", **engine_args)]  # fp32: the CPU box's teacher, the one drafts serve
    tokenizer = engines[0].get_tokenizer()
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    loaded = time.perf_counter() - started

    def run(indices: list[int], temp: float, seed: int) -> list[dict]:
        params = [SamplingParams(temperature=temp, max_tokens=max_tokens, seed=None if temp == 0 else seed + i)
                  for i in indices]
        outputs = engines[0].generate([ids[i] for i in indices], params, use_tqdm=False)
        return [{"prompt": prompts[i], "prompt_ids": ids[i], "output_ids": list(o.outputs[0].token_ids),
                 "temperature": temp} for i, o in zip(indices, outputs, strict=True)]

    t0 = time.perf_counter()  # the budget counts generation, not the engine's start (load, CUDA graphs)
    greedy = run(list(range(len(prompts))), 0.0, 0)
    greedy_seconds = time.perf_counter() - t0
    tokens = sum(len(r["output_ids"]) for r in greedy)
    log(f"{len(greedy)} greedy answers, {tokens} tokens in {greedy_seconds:.1f} s ({tokens / greedy_seconds:.0f} tok/s)")
    train, held_records = greedy[: len(prompts) - held], greedy[len(prompts) - held :]
    training = list(range(len(prompts) - held))
    for sample in range(samples):
        if time.perf_counter() - t0 + greedy_seconds * (len(training) / len(prompts)) > seconds:
            break
        train += run(training, temperature, 1_000_003 * (sample + 1))
        log(f"sampled pass {sample + 1}: {len(train)} training answers")
    stats = {"prompts": len(prompts), "held_out_prompts": held, "training_answers": len(train),
             "sampled_passes": (len(train) - len(training)) // max(1, len(training)), "temperature": temperature,
             "max_tokens": max_tokens, "greedy_tokens_per_s": tokens / greedy_seconds, "load_seconds": loaded,
             "answer_tokens": sum(len(r["output_ids"]) for r in train + held_records),
             "seconds": time.perf_counter() - started}
    engines.clear()  # the engine's KV cache must go before training takes the card
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return train, held_records, stats


def teacher_prompts(teacher: str, count: int, device: str, openings: str = "kinds") -> list[str]:
    """``count`` user turns the teacher writes itself (Magpie-style), in batches of 256 on a GPU; the engine is gone
    before the answers' engine starts. ``openings``: ``kinds`` steers them to the kinds of chat request
    (``SELF_PROMPT_OPENINGS``: stories, tips, explanations, ...), ``none`` is plain Magpie. Turns too close to an
    evaluation chat prompt are dropped (distill_self_prompts.near_benchmark)."""
    from distill_cpu import CHAT_PROMPTS
    from distill_self_prompts import ENGINE_CHAT_PROMPTS, near_benchmark

    from tokenmill.distill.teacher_data import SELF_PROMPT_OPENINGS, self_prompts

    started = time.perf_counter()
    engine_args = ({"gpu_memory_utilization": 0.3, "max_model_len": 512, "enforce_eager": True}
                   if device.startswith("cuda") else {})
    written = self_prompts(teacher, count, batch_size=256 if device.startswith("cuda") else 32,
                           log=lambda _: None, engine_args=engine_args,
                           openings=SELF_PROMPT_OPENINGS if openings == "kinds" else ("",))
    prompts = [p for p in written if not near_benchmark(p, CHAT_PROMPTS + ENGINE_CHAT_PROMPTS)]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"{len(prompts)} self-written prompts ({len(written) - len(prompts)} dropped as near an evaluation "
          f"prompt) in {time.perf_counter() - started:.1f} s", flush=True)
    return prompts


def draft_config(teacher: str, out: Path, device: str, layers: int, records: int, **overrides):
    from tokenmill.distill.config import DistillConfig

    values = dict(target="draft", teacher=teacher, layer_map=list(range(layers)), freeze_word_embeddings=True,
                  teacher_generated=records, teacher_max_tokens=128, batch_size=64, seq_len=256, lr=1e-3,
                  warmup_steps=50, temperature=1.0, eval_batches=8, checkpoint_every=0, out=str(out), device=device,
                  progress=False, steps=100_000)
    values.update(overrides)
    return DistillConfig(**values)


def greedy_pass(model, tokenizer, prompts: list[str], max_new: int, device: str) -> tuple[list[list[int]], float]:
    """``model``'s greedy ``max_new`` tokens after each chat benchmark prompt (transformers generate, batch 1) and its
    tokens/s over them (after one warm-up call)."""
    continuations, seconds = [], 0.0
    with torch.no_grad():
        warm = torch.tensor([hf_prompt_ids(tokenizer, prompts[0])], device=device)
        model.generate(warm, max_new_tokens=2, do_sample=False)
        for prompt in prompts:
            ids = torch.tensor([hf_prompt_ids(tokenizer, prompt)], device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
            seconds += time.perf_counter() - started
            continuations.append(out[0, ids.shape[1]:].tolist())
    return continuations, len(prompts) * max_new / seconds


def acceptance(student, tokenizer, prompts: list[str], continuations: list[list[int]], k: int, device: str) -> dict:
    """distill_cpu.py's measure: exact replay of greedy speculative decoding (k draft tokens a round) against the
    teacher's greedy continuation of the chat benchmark prompts; mean tokens emitted per round."""
    from distill_cpu import acceptance_lengths

    ids = [torch.tensor([hf_prompt_ids(tokenizer, p)]) for p in prompts]
    lengths = acceptance_lengths(_OnDevice(student, device), ids, continuations, k)
    return {"k": k, "prompts": len(prompts), "max_new_tokens": len(continuations[0]), "rounds": len(lengths),
            "mean_acceptance_length": sum(lengths) / len(lengths)}


class _OnDevice:
    """``generate`` on ``device`` for CPU prefixes (distill_cpu's replay builds them on the CPU)."""

    def __init__(self, model, device: str) -> None:
        self.model, self.device = model, device

    def generate(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model.generate(ids.to(self.device), **kwargs).cpu()


def draft_speed(teacher, student, tokenizer, prompts: list[str], max_new: int, k: int, device: str,
                teacher_tps: float, continuations: list[list[int]], assisted: bool) -> dict:
    """Batch-1 greedy tokens/s of the student beside the teacher's (transformers generate, fp32) and, with
    ``assisted``, transformers' assisted generation with the student as assistant (constant k), outputs checked
    against the teacher's greedy ones."""
    from distill_cpu import assisted_seconds

    _, student_tps = greedy_pass(student, tokenizer, prompts, max_new, device)
    record = {"teacher_tokens_per_s": teacher_tps, "student_tokens_per_s": student_tps,
              "student_vs_teacher": student_tps / teacher_tps, "how": "transformers generate, batch 1, fp32"}
    if not assisted:
        return record
    ids = [torch.tensor([hf_prompt_ids(tokenizer, p)], device=device) for p in prompts]
    try:
        spec_seconds = assisted_seconds(teacher, student, ids, max_new, k, continuations)
        plain = len(ids) * max_new / teacher_tps
        record.update(assisted_seconds=spec_seconds, teacher_alone_seconds=plain, assisted_speedup=plain / spec_seconds)
    except RuntimeError as exc:  # numerics on the device may move a greedy tie; say so rather than fail the job
        record["assisted_error"] = str(exc)
    return record


def draft_quality(summary: dict) -> dict:
    last, first = summary["evals"][-1], summary["evals"][0]
    quality = {k: last[k] for k in ("top1_agreement", "kl_to_teacher", "student_perplexity", "teacher_perplexity")}
    quality.update({"top1_agreement_at_init": first["top1_agreement"],
                    "held_out": "greedy teacher answers to held-out prompts",
                    **{key: value for key, value in last.items() if key.startswith("text_")}})
    return quality


def pick_draft(results: dict[int, dict], target: float = 2.0) -> int:
    """The shallowest student that reaches ``target`` tokens a round (the cheapest draft that does), else the one
    with the longest acceptance."""
    reaching = [depth for depth, r in results.items() if r["speculative"]["mean_acceptance_length"] >= target]
    if reaching:
        return min(reaching)
    return max(results, key=lambda depth: results[depth]["speculative"]["mean_acceptance_length"])


def draft_job(teacher: str, out: Path, work: Path, device: str, layers: list[int], prompts: list[str], held: int,
              samples: int, generation_seconds: float, training_seconds: float, bench_prompts: list[str],
              max_new: int, k: int, engine_args: dict | None = None, overrides: dict | None = None,
              assisted: bool = False) -> dict:
    """Teacher answers once; then each depth in ``layers`` trained for ``training_seconds`` on them and measured
    (held-out agreement, acceptance); the shallowest that reaches 2.0 tokens a round (else the best) is timed and
    its trained tensors written (only one fits the files that come back)."""
    record = Record(out / "gpu_distill_draft.json", "draft", device_name(device))
    # eager: CUDA-graph capture would cost seconds of a device lent for minutes, for a one-off generation
    engine_args = engine_args if engine_args is not None else {"max_num_seqs": 256, "max_model_len": 512,
                                                                "gpu_memory_utilization": 0.3, "enforce_eager": True}
    train, held_records, stats = generate_records(teacher, prompts, held, samples, 128, SAMPLE_TEMPERATURE,
                                                  generation_seconds, engine_args)
    record.update("generation", generation=stats)
    results: dict[int, dict] = {}
    students: dict[int, torch.nn.Module] = {}
    continuations = None
    for depth in layers:
        config = draft_config(teacher, work / f"draft{depth}", device, depth, len(prompts), **(overrides or {}))
        task = make_draft_task(config, train, held_records)
        summary = train_for(task, config, training_seconds)
        student, teacher_model, tokenizer = task.student.eval(), task.teacher.eval(), task.tokenizer
        for model in (teacher_model, student):
            model.generation_config.pad_token_id = tokenizer.eos_token_id
        if continuations is None:
            continuations, teacher_tps = greedy_pass(teacher_model, tokenizer, bench_prompts, max_new, device)
        results[depth] = {"training": summary, "quality": draft_quality(summary),
                          "speculative": acceptance(student, tokenizer, bench_prompts, continuations, k, device),
                          "curve": curve(summary, out / f"gpu_distill_draft_l{depth}.png")}
        students[depth] = student
        print(f"{depth} layers: {json.dumps(results[depth]['quality'])} {results[depth]['speculative']}", flush=True)
        chosen = pick_draft(results)
        if chosen == depth:  # written as soon as it leads, so a run stopped later still returns a student
            for stale in record.data.get("trained_files", []):
                (out / stale).unlink(missing_ok=True)
            files = save_trained(student, out, "draft_student", torch.float16)
            record.data.update(chosen_layers=chosen, training=results[chosen]["training"],
                               quality=results[chosen]["quality"], speculative=results[chosen]["speculative"],
                               trained_files=files, student_shape={"layers": chosen, "layer_map": list(range(chosen))})
        record.update(f"draft_{depth}_layers", students={d: {key: r[key] for key in ("quality", "speculative")}
                                                         for d, r in results.items()},
                      per_depth_training={d: r["training"] for d, r in results.items() if d != chosen})
        gc.collect()
    record.update("speed", speed=draft_speed(teacher_model, students[chosen], tokenizer, bench_prompts, max_new, k,
                                             device, teacher_tps, continuations, assisted))
    return record.data


# ---------------------------------------------------------------- restore (CPU box)
def restore(results: Path, out: Path, encoder_teacher: str | None = None, encoder_head: str | None = None,
            draft_teacher: str | None = None) -> dict:
    """Full student directories from the trained tensors that came back: the encoder (saved, exported to
    ``out/models``, evaluated against the real teacher) and the draft (saved with a distill_summary.json, so
    ``distill_cpu.py --measure-draft`` and ``spec_decode_cpu.py`` take it)."""
    report = {}
    encoder_json = results / "gpu_distill_encoder.json"
    if encoder_json.is_file():
        from tokenmill.distill.encoder import EncoderTask

        record = json.loads(encoder_json.read_text())
        config = encoder_config(encoder_teacher, encoder_head, out / "encoder", "cpu", steps=2, warmup_steps=1,
                                **record["student_shape"])
        task = EncoderTask(config)
        count = load_trained(task.student, results, record["trained_files"])
        task.save_student(config.out_dir)
        export = task.export(config.out_dir, out / "models", "sentiment_student")
        task.student.eval()
        with torch.no_grad():
            evaluation = task.evaluate()
        report["encoder"] = {"student_dir": str(config.out_dir), "tensors": count, "evaluation_cpu": evaluation,
                             "onnx": str(out / "models" / "sentiment_student" / "1" / "model.onnx"),
                             "onnx_max_abs_vs_torch": export["validation"]["max_abs"]}
    draft_json = results / "gpu_distill_draft.json"
    if draft_json.is_file():
        from tokenmill.distill.config import DistillConfig
        from tokenmill.distill.llm import DraftTask

        record = json.loads(draft_json.read_text())
        trained = record["training"]["config"]
        config = DistillConfig(target="draft", teacher=draft_teacher, layer_map=record["student_shape"]["layer_map"],
                               freeze_word_embeddings=True, steps=2, warmup_steps=1, out=str(out / "draft"),
                               device="cpu", progress=False, seq_len=trained["seq_len"], batch_size=8)
        task = DraftTask(config)
        count = load_trained(task.student, results, record["trained_files"])
        task.save_student(config.out_dir)
        summary = {k: record["training"][k] for k in ("config", "model", "evals", "seconds", "history")}
        (config.out_dir / "distill_summary.json").write_text(json.dumps(summary, indent=2))
        report["draft"] = {"student_dir": str(config.out_dir), "tensors": count}
    if (results / "gpu_distill_eagle.json").is_file():
        from gpu_eagle import restore_eagle

        report["eagle"] = restore_eagle(results, out / "eagle", draft_teacher)
    if not report:
        raise SystemExit(f"{results} holds none of gpu_distill_encoder.json, gpu_distill_draft.json, "
                         "gpu_distill_eagle.json")
    (out / "restore_report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", type=Path, help="CPU box: write PREFIX_encoder/_llm1/_llm2 carry folders, exit")
    parser.add_argument("--wheel-dir", type=Path, default=ROOT / ".whl", help="where the gguf wheel lies (prepare)")
    parser.add_argument("--extra-text", type=Path, default=None,
                        help="prepare: more KJV text (not Ruth / Ecclesiastes, the held-out books) for the "
                             "encoder; encoder job: read it from here instead of the carry")
    parser.add_argument("--job", choices=("encoder", "draft", "eagle"),
                        help="device: which student to train (eagle: the EAGLE head, benchmarks/gpu_eagle.py)")
    parser.add_argument("--carry", type=Path, default=ROOT / ".distill_carry", help="the prefix given to --prepare")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_distill_out")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_distill_work"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--encoder-seconds", default="45,20", help="stage 1, stage 2 training seconds")
    parser.add_argument("--draft-layers", default="6", help="student depths trained, e.g. 4,6 (each --training-seconds)")
    parser.add_argument("--assisted", action="store_true", help="draft: also time transformers' assisted generation")
    parser.add_argument("--encoder-teacher", type=Path, default=None,
                        help="encoder job: this MiniLM directory (e.g. the bundled one, on the CPU box) instead of "
                             "the carried fp16 copy")
    parser.add_argument("--encoder-continue", type=Path, default=None,
                        help="encoder job: skip stage 1 and continue this trained student directory")
    parser.add_argument("--compile", action="store_true", help="encoder: time the torch backend compiled")
    parser.add_argument("--encoder-batch-sizes", default="1,32", help="encoder: batch sizes timed (seq 64)")
    parser.add_argument("--samples", type=int, default=6, help="sampled answers per training prompt (time allowing)")
    parser.add_argument("--generation-seconds", type=float, default=40,
                        help="draft: generation time after the engine started (greedy pass, then sampled ones)")
    parser.add_argument("--training-seconds", type=float, default=55)
    parser.add_argument("--max-prompts", type=int, default=None, help="draft: only the first N bundled prompts")
    parser.add_argument("--self-prompts", type=int, default=0,
                        help="draft: also N prompts the teacher writes itself (teacher_data.self_prompts), before "
                             "the bundled ones (the held-out tenth stays bundled prompts)")
    parser.add_argument("--self-prompt-openings", choices=["kinds", "none"], default="kinds",
                        help="draft: steer the self-written turns to kinds of chat request (kinds) or not (none)")
    parser.add_argument("--encoder-overrides", type=json.loads, default={},
                        help='DistillConfig fields for both encoder stages as JSON, e.g. \'{"batch_size": 64}\'')
    parser.add_argument("--draft-overrides", type=json.loads, default={}, help="DistillConfig fields of the draft")
    parser.add_argument("--llm-teacher", default=None,
                        help="draft/eagle: this GGUF or HF directory instead of the carried GGUF (CPU runs)")
    parser.add_argument("--seconds", type=float, default=270,
                        help="eagle: the whole job's budget from its start (loads included), split by --phase-ends")
    parser.add_argument("--phase-ends", default="0.15,0.42,0.5,0.86,1",
                        help="eagle: where prompts, answers, features, training and eval end, as shares of --seconds")
    parser.add_argument("--answer-max-tokens", type=int, default=96, help="eagle: teacher answer length cap")
    parser.add_argument("--held-out", type=int, default=None,
                        help="eagle: only the first N of the 133 held-out prompts (CPU checks; the device uses all)")
    parser.add_argument("--chat-max-tokens", type=int, default=96,
                        help="eagle: tokens per chat prompt in the reference loop (spec_decode_cpu.py's 96)")
    parser.add_argument("--eagle-overrides", type=json.loads, default={},
                        help='eagle: DistillConfig fields of --target eagle as JSON, e.g. '
                             '\'{"unroll": 3, "batch_size": 256, "feature_noise": 0.2}\'')
    parser.add_argument("--restore", type=Path, help="CPU box: the folder of files that came back")
    parser.add_argument("--restore-out", type=Path, default=Path("/tmp/gpu_distill_restored"))
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.wheel_dir, args.extra_text)
        return
    if args.restore:
        print(json.dumps(restore(args.restore, args.restore_out), indent=2, default=str))
        return
    if args.job is None:
        parser.error("give --prepare, --job or --restore")
    args.out.mkdir(parents=True, exist_ok=True)
    dirs = carry_dirs(args.carry)
    if args.job == "encoder":
        from tokenmill.distill.data import read_corpus, sentences
        from tokenmill.modelserver.bundled import data_path

        teacher = args.encoder_teacher or rebuild_encoder_teacher(dirs["encoder"], args.work / "minilm")
        seconds = tuple(float(x) for x in args.encoder_seconds.split(","))
        extra = args.extra_text or dirs["encoder"] / EXTRA_TEXT
        data = encoder_job(teacher, data_path("sentiment_head.json"), args.out, args.work, args.device, seconds,
                           [int(b) for b in args.encoder_batch_sizes.split(",")], 30, args.encoder_overrides,
                           extra_sentences=sentences(read_corpus(extra)) if extra.is_file() else [], compile=args.compile,
                           start_from=args.encoder_continue)
    elif args.job == "eagle":
        from distill_self_prompts import ENGINE_CHAT_PROMPTS
        from gpu_eagle import default_prompts, eagle_job

        held, train = default_prompts()
        data = eagle_job(args.llm_teacher or str(carried_gguf(dirs, args.work)), args.out, args.work, args.device,
                         args.seconds, held[: args.held_out], train[: args.max_prompts], ENGINE_CHAT_PROMPTS,
                         self_prompt_count=args.self_prompts, samples=args.samples,
                         max_tokens=args.answer_max_tokens, chat_max_tokens=args.chat_max_tokens,
                         train_overrides=args.eagle_overrides,
                         phase_ends=tuple(float(x) for x in args.phase_ends.split(",")))
    else:
        from distill_cpu import CHAT_PROMPTS

        from tokenmill.distill.data import HELDOUT_FRACTION
        from tokenmill.distill.teacher_data import bundled_prompts

        gguf = args.llm_teacher or carried_gguf(dirs, args.work)
        prompts = bundled_prompts()[: args.max_prompts]
        if args.self_prompts:
            prompts = teacher_prompts(str(gguf), args.self_prompts, args.device, args.self_prompt_openings) + prompts
        layers = [int(x) for x in args.draft_layers.split(",")]
        data = draft_job(str(gguf), args.out, args.work, args.device, layers, prompts,
                         max(1, round(len(prompts) * HELDOUT_FRACTION)), args.samples, args.generation_seconds,
                         args.training_seconds, CHAT_PROMPTS, 96, 4, overrides=args.draft_overrides,
                         assisted=args.assisted)
    print(json.dumps({k: data.get(k) for k in ("quality", "speculative", "speed", "generation", "held_out",
                                                "chat_prompts") if k in data}, indent=2, default=str))


if __name__ == "__main__":
    main()
