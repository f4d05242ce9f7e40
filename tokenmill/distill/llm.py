"""``--target draft``: a smaller decoder of the teacher's family and tokenizer, trained on token-level KL to the
teacher's next-token distributions; saved as an HF directory that tokenmill serves and that speculative
decoding can use as its draft model."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.data import HELDOUT_FRACTION, split_windows, token_windows, train_and_heldout_text
from tokenmill.distill.losses import hidden_mse, kd_loss, kl_to_teacher
from tokenmill.distill.students import (
    check_not_larger,
    check_same_vocabulary,
    hidden_pairs,
    init_from_teacher,
    student_config,
    teacher_layer_map,
)
from tokenmill.spec_decode.draft_vocab import (
    check_draft_vocab_size,
    count_token_ids,
    rank_token_ids,
    write_draft_vocab,
)


def load_teacher(source: str | None) -> tuple[nn.Module, object, str]:
    """(transformers model in fp32, HF tokenizer, description) from an HF directory, a .gguf file, or the
    embedded SmolLM2 GGUF (dequantized from Q4_1 by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.model.gguf_loader import load_gguf_tokenizer
    from tokenmill.model.loader import embedded_model_path

    path = Path(source).expanduser() if source else embedded_model_path()
    if path.is_file() and path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        wrapped = load_gguf_tokenizer(path)  # BOS/EOS ids as the file says (some transformers releases differ)
        if wrapped is None:
            raise ValueError(f"teacher {str(path)!r} has no tokenizer; distillation needs the teacher's tokenizer")
        tokenizer = wrapped.hf
    elif path.is_dir() and (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    else:
        raise ValueError(f"teacher {str(path)!r} is neither a model directory with config.json nor a .gguf file")
    return model.eval(), tokenizer, str(path)  # fp32 already (dtype above; GGUF tensors are dequantized)


def training_token_counts(windows: torch.Tensor, mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """How often each id is a training target: the answer tokens (``mask``: logits that predict one, as
    ``answer_batch`` marks them), else every token of the windows."""
    if mask is None:
        return count_token_ids([windows], vocab_size)
    return count_token_ids([windows[:, 1:][mask[:, :-1]]], vocab_size)


def draft_vocab_from_answers(model_dir: Path, cache: Path, num_prompts: int, seq_len: int, size: int) -> Path:
    """Write ``model_dir``'s draft vocabulary (spec_decode/draft_vocab.py) from the answers a ``--teacher-generated
    num_prompts --seq-len seq_len`` run trained on (the cache's first ``num_prompts`` records less the held-out
    tenth): for a draft trained before ``--draft-vocab-size`` existed, or trained elsewhere on the same answers."""
    import json

    from tokenmill.distill.teacher_data import answer_batch

    records = [json.loads(line) for line in Path(cache).read_text().splitlines() if line.strip()][:num_prompts]
    if len(records) < num_prompts:
        raise ValueError(f"{cache} holds {len(records)} answers; the draft was trained on {num_prompts}")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    held = max(1, round(len(records) * HELDOUT_FRACTION))
    windows, mask = answer_batch(records[:-held], seq_len, 0)  # padding is outside the mask: any id
    return write_draft_vocab(Path(model_dir), training_token_counts(windows, mask, config["vocab_size"]), size)


class DraftTask:
    """Teacher + student decoders over fixed-length token windows of the training text."""

    def __init__(self, config: DistillConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = torch.device(config.device)
        teacher, self.tokenizer, self.teacher_source = load_teacher(config.teacher)
        if config.student is not None:
            student_dir = Path(config.student).expanduser()
            if not (student_dir / "config.json").is_file():
                raise ValueError(f"--student {config.student!r} is not a model directory (no config.json)")
            student_tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
            check_same_vocabulary(self.tokenizer.get_vocab(), student_tokenizer.get_vocab(), config.student)
            student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
            self.init_report = f"weights from {config.student}"
        else:
            shape = student_config(teacher.config, config.student_layers, config.student_hidden_size,
                                   config.student_intermediate_size)
            torch.manual_seed(config.seed)
            student = AutoModelForCausalLM.from_config(shape, dtype=torch.float32)
            layer_map = teacher_layer_map(teacher.config.num_hidden_layers, shape.num_hidden_layers, config.layer_map)
            copied, total = init_from_teacher(student, teacher, layer_map)
            self.init_report = f"{copied}/{total} tensors copied from teacher layers {layer_map}"
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError(f"the student's vocab_size {student.config.vocab_size} differs from the teacher's "
                             f"{teacher.config.vocab_size}; distillation needs one shared vocabulary")
        if config.draft_vocab_size is not None:
            check_draft_vocab_size(config.draft_vocab_size, teacher.config.vocab_size)
        self.student_params, self.teacher_params = check_not_larger(student, teacher)
        self.layer_map = teacher_layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers,
                                           config.layer_map)
        if config.hidden_weight > 0 and student.config.hidden_size != teacher.config.hidden_size:
            raise ValueError("--hidden-weight needs the student's hidden size to equal the teacher's "
                             f"({student.config.hidden_size} vs {teacher.config.hidden_size})")
        for token in ("eos_token_id", "bos_token_id"):  # the tokenizer's ids, which tokenmill serves with
            if getattr(self.tokenizer, token, None) is not None:
                setattr(student.config, token, getattr(self.tokenizer, token))
        if config.freeze_word_embeddings:
            if student.config.hidden_size != teacher.config.hidden_size and config.student is None:
                raise ValueError("--freeze-word-embeddings keeps the teacher's embeddings; a narrower student has "
                                 "freshly initialised ones, which must train")
            student.get_input_embeddings().weight.requires_grad_(False)
            student.get_output_embeddings().weight.requires_grad_(False)
        self.teacher = teacher.to(self.device).requires_grad_(False)
        self.student = student.to(self.device)
        self._load_data()
        self.vocab_counts: torch.Tensor | None = None  # training-token counts, for --draft-vocab-size
        self.vocab_ids: torch.Tensor | None = None  # the N ids the saved draft proposes from
        if config.draft_vocab_size is not None:
            self.vocab_counts = training_token_counts(self.train_windows, self.train_mask, teacher.config.vocab_size)
            self.vocab_ids = rank_token_ids(self.vocab_counts)[: config.draft_vocab_size].to(self.device)

    def _load_data(self) -> None:
        # (ids, loss mask or None) per held-out set; "text": windows of held-out text; "answers": held-out teacher
        # answers (with --teacher-generated). The first set's metrics are the headline ones.
        self.eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.train_mask: torch.Tensor | None = None
        if self.config.teacher_generated:
            self._load_teacher_answers()
        train_text, held_text, self.data_source = train_and_heldout_text(self.config.data, self.config.eval_data)
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        if self.config.teacher_generated:
            self.eval_sets["text"] = (token_windows(encode(held_text), self.config.seq_len), None)
            self.num_examples = len(self.train_windows)
            return
        windows = token_windows(encode(train_text), self.config.seq_len)
        if held_text is None:
            if len(windows) < 2:
                raise ValueError(f"--data holds {len(windows)} window(s) of --seq-len {self.config.seq_len} tokens; "
                                 "it needs at least 2 (one to train on, one held out)")
            self.train_windows, self.eval_windows = split_windows(windows)
        else:
            self.train_windows, self.eval_windows = windows, token_windows(encode(held_text), self.config.seq_len)
        if len(self.train_windows) == 0 or len(self.eval_windows) == 0:
            raise ValueError(f"the text is shorter than one --seq-len window ({self.config.seq_len} tokens); "
                             "give more text or a smaller --seq-len")
        self.eval_sets["text"] = (self.eval_windows, None)
        self.num_examples = len(self.train_windows)

    def _load_teacher_answers(self) -> None:
        from tokenmill.distill.teacher_data import answer_batch, teacher_answers

        config = self.config
        train, held, self.answer_source = teacher_answers(
            config, log=lambda line: print(line, flush=True) if config.progress else None)
        pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.train_windows, self.train_mask = answer_batch(train, config.seq_len, pad)
        self.eval_sets["answers"] = answer_batch(held, config.seq_len, pad)

    def trainable(self) -> nn.Module:
        return self.student

    def _forward(self, ids: torch.Tensor, hidden: bool):
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        student = self.student(input_ids=ids, output_hidden_states=hidden, use_cache=False)
        return teacher, student

    def _batch(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Padded answers cut to the batch's longest masked position (+ 1 for its target), on the device."""
        if mask is not None:
            used = int(mask.any(0).nonzero().max()) + 2 if mask.any() else 2
            ids, mask = ids[:, :used], mask[:, :used].to(self.device)
        return ids.to(self.device), mask

    def loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]:
        ids, mask = self._batch(self.train_windows[indices],
                                None if self.train_mask is None else self.train_mask[indices])
        hidden = self.config.hidden_weight > 0
        teacher, student = self._forward(ids, hidden)
        kd = kd_loss(student.logits, teacher.logits, self.config.temperature, self.config.kd_loss,
                     self.config.jsd_beta, mask=mask)
        total, parts = kd, {"kd": kd.item()}
        if hidden:
            match = hidden_mse(*hidden_pairs(student.hidden_states, teacher.hidden_states, self.layer_map,
                                             self.config.hidden_layers), mask=mask)
            total = total + self.config.hidden_weight * match
            parts["hidden_mse"] = match.item()
        parts["loss"] = total.item()
        return total, parts, ids.numel() if mask is None else int(mask.sum())

    def evaluate(self) -> dict[str, float]:
        """Held-out: KD loss, KL(teacher || student), both perplexities, next-token top-1 agreement; per held-out
        set, the first set's unprefixed (with --teacher-generated: the answers, then the text as ``text_*``)."""
        record: dict[str, float] = {}
        for number, (name, (ids, mask)) in enumerate(self.eval_sets.items()):
            prefix = "" if number == 0 else f"{name}_"
            record.update({prefix + k: v for k, v in self._evaluate_set(ids, mask).items()})
        return record

    def _evaluate_set(self, windows: torch.Tensor, masks: torch.Tensor | None) -> dict[str, float]:
        sums = {"kd": 0.0, "kl": 0.0, "student_nll": 0.0, "teacher_nll": 0.0, "agree": 0.0, "agree_subset": 0.0,
                "covered": 0.0}
        rows = 0
        size = self.config.batch_size
        for start in range(0, min(len(windows), size * self.config.eval_batches), size):
            ids, mask = self._batch(windows[start : start + size],
                                    None if masks is None else masks[start : start + size])
            teacher, student = self._forward(ids, False)
            s_logits, t_logits = student.logits[:, :-1].float(), teacher.logits[:, :-1].float()
            targets = ids[:, 1:]
            keep = (torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, :-1])
            s_logits, t_logits, targets = s_logits[keep], t_logits[keep], targets[keep]
            n = targets.numel()
            sums["kd"] += float(kd_loss(s_logits, t_logits, self.config.temperature, self.config.kd_loss,
                                        self.config.jsd_beta)) * n
            sums["kl"] += float(kl_to_teacher(s_logits, t_logits)) * n
            sums["student_nll"] += float(F.cross_entropy(s_logits, targets, reduction="sum"))
            sums["teacher_nll"] += float(F.cross_entropy(t_logits, targets, reduction="sum"))
            teacher_top = t_logits.argmax(-1)
            sums["agree"] += float((s_logits.argmax(-1) == teacher_top).sum())
            if self.vocab_ids is not None:  # what the draft proposes: its argmax among the N ids
                subset_top = self.vocab_ids[s_logits.index_select(1, self.vocab_ids).argmax(-1)]
                sums["agree_subset"] += float((subset_top == teacher_top).sum())
                sums["covered"] += float(torch.isin(teacher_top, self.vocab_ids).sum())
            rows += n
        means = {k: v / max(rows, 1) for k, v in sums.items()}
        subset = {} if self.vocab_ids is None else {
            "top1_agreement_draft_vocab": means["agree_subset"], "teacher_top1_in_draft_vocab": means["covered"]}
        return {**subset, "loss": means["kd"], "kd_loss": means["kd"], "kl_to_teacher": means["kl"],
                "student_perplexity": float(torch.tensor(means["student_nll"]).exp()),
                "teacher_perplexity": float(torch.tensor(means["teacher_nll"]).exp()),
                "top1_agreement": means["agree"], "eval_tokens": rows}

    def save_student(self, out_dir: Path) -> None:
        """config.json + model.safetensors (fp32) + the teacher's tokenizer files + generation_config.json."""
        from transformers import GenerationConfig

        out_dir.mkdir(parents=True, exist_ok=True)
        self.student.to("cpu").save_pretrained(str(out_dir), safe_serialization=True)
        self.student.to(self.device)
        self.tokenizer.save_pretrained(str(out_dir))
        GenerationConfig(eos_token_id=self.student.config.eos_token_id,
                         bos_token_id=self.student.config.bos_token_id).save_pretrained(str(out_dir))
        if self.vocab_counts is not None:
            write_draft_vocab(out_dir, self.vocab_counts, self.config.draft_vocab_size)

    def describe(self) -> dict:
        return {"teacher": self.teacher_source, "teacher_params": self.teacher_params,
                "student_params": self.student_params, "student_layers": self.student.config.num_hidden_layers,
                "student_hidden_size": self.student.config.hidden_size,
                "teacher_layers": self.teacher.config.num_hidden_layers, "layer_map": self.layer_map,
                "init": self.init_report,
                "data": getattr(self, "answer_source", self.data_source), "train_windows": len(self.train_windows),
                "eval_windows": {name: len(ids) for name, (ids, _) in self.eval_sets.items()},
                "word_embeddings": "trained" if self.student.get_input_embeddings().weight.requires_grad
                else "frozen (the teacher's)"}
