"""``--target encoder``: a BERT-family student (fewer layers and/or narrower) of the model server's sentiment
encoder (MiniLM + mean pooling + a linear head), trained on the head's soft labels at a temperature plus
embedding (cosine) and optional hidden-state matching; saved as an HF directory + head JSON that
``tokenmill export --hf-dir DIR --head DIR/head.json`` turns into a validated ONNX model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.data import (
    HELDOUT_FRACTION,
    NARRATIVE_TEXT,
    read_corpus,
    sentences,
    train_and_heldout_text,
)
from tokenmill.distill.losses import hidden_mse, kd_loss, kl_to_teacher
from tokenmill.distill.students import (
    check_not_larger,
    check_same_vocabulary,
    hidden_pairs,
    init_from_teacher,
    student_config,
    teacher_layer_map,
)
from tokenmill.modelserver import bundled

HEAD_FILE = "head.json"
ENCODER_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def _vocab(directory: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    if not (directory / "tokenizer.json").is_file():
        raise ValueError(f"{str(directory)!r} has no tokenizer.json; encoder distillation needs a fast tokenizer")
    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, as the model server's MeanPoolClassifier pools (before normalising)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def set_dropout(encoder: nn.Module, p: float) -> None:
    """Every dropout of ``encoder`` (and its saved config) to ``p``."""
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    encoder.config.hidden_dropout_prob = encoder.config.attention_probs_dropout_prob = p


class EncoderTask:
    """Teacher and student MeanPoolClassifiers over sentences; a projection (training only) maps a narrower
    student's states into the teacher's space for the cosine and hidden-state losses."""

    def __init__(self, config: DistillConfig) -> None:
        from transformers import AutoModel

        self.config = config
        self.device = torch.device(config.device)
        self.teacher_dir = Path(config.teacher).expanduser() if config.teacher else bundled.minilm_dir()
        if not (self.teacher_dir / "config.json").is_file():
            raise ValueError(f"teacher {str(self.teacher_dir)!r} is not an encoder directory (no config.json)")
        head_path = config.teacher_head or (None if config.teacher else bundled.data_path("sentiment_head.json"))
        if head_path is None:
            raise ValueError("--teacher-head is required with --teacher DIR for --target encoder: the student "
                             "learns the head's soft labels (a JSON as written by modelserver's train_head)")
        teacher_head, self.head_record = bundled.load_head(Path(head_path))
        teacher = bundled.MeanPoolClassifier(bundled.load_encoder(self.teacher_dir), teacher_head).eval()
        teacher_vocab = _vocab(self.teacher_dir)
        self.tokenizer = bundled.load_tokenizer(self.teacher_dir, max_tokens=config.seq_len)
        if config.student is not None:
            student_dir = Path(config.student).expanduser()
            if not (student_dir / "config.json").is_file():
                raise ValueError(f"--student {config.student!r} is not a model directory (no config.json)")
            check_same_vocabulary(teacher_vocab, _vocab(student_dir), config.student)
            encoder = bundled.load_encoder(student_dir)
            self.init_report = f"weights from {config.student}"
            trained_embeddings = True
        else:
            shape = student_config(teacher.encoder.config, config.student_layers, config.student_hidden_size,
                                   config.student_intermediate_size)
            torch.manual_seed(config.seed)
            encoder = AutoModel.from_config(shape, attn_implementation="eager")
            layer_map = teacher_layer_map(teacher.encoder.config.num_hidden_layers, shape.num_hidden_layers, config.layer_map)
            copied, total = init_from_teacher(encoder, teacher.encoder, layer_map, config.intermediate_init)
            self.init_report = f"{copied}/{total} tensors copied from teacher layers {layer_map}"
            trained_embeddings = shape.hidden_size == teacher.encoder.config.hidden_size
        self.freeze_word_embeddings = (trained_embeddings if config.freeze_word_embeddings is None
                                       else config.freeze_word_embeddings)
        if self.freeze_word_embeddings and not trained_embeddings:
            raise ValueError("--freeze-word-embeddings needs trained word embeddings: a student narrower than the "
                             "teacher starts from random ones (drop the flag or give --student DIR)")
        # Fixed word embeddings: a third of the step time was AdamW on the 30522 x width table, and the small
        # corpus touches only part of the vocabulary (the rest would only drift by weight decay).
        encoder.get_input_embeddings().weight.requires_grad_(not self.freeze_word_embeddings)
        set_dropout(encoder, config.student_dropout)
        width, teacher_width = encoder.config.hidden_size, teacher.encoder.config.hidden_size
        head = nn.Linear(width, teacher_head.out_features)
        if width == teacher_width:
            head.load_state_dict(teacher_head.state_dict())
        self.student = bundled.MeanPoolClassifier(encoder, head)
        self.student_params, self.teacher_params = check_not_larger(self.student, teacher)
        self.layer_map = teacher_layer_map(teacher.encoder.config.num_hidden_layers, encoder.config.num_hidden_layers,
                                           config.layer_map)
        self.projection = nn.Linear(width, teacher_width, bias=False) if width != teacher_width else nn.Identity()
        self.modules = nn.ModuleDict({"student": self.student, "projection": self.projection}).to(self.device)
        self.teacher = teacher.to(self.device).requires_grad_(False)
        self._load_data()
        # The teacher is frozen, so its pooled embedding and logits per sentence are computed once, in fixed
        # batches (the same numbers on a resumed run), instead of a teacher forward in every step. Hidden-state
        # matching needs the teacher's per-token states of each batch, so it keeps the forward per step.
        self.train_targets = None if config.hidden_weight > 0 else self._teacher_targets(self.sentences)
        self.eval_targets = self._teacher_targets(self.eval_sentences)

    def _load_data(self) -> None:
        from tokenmill.modelserver.train_head import is_held_out, load_rows

        train_text, held_text, self.data_source = train_and_heldout_text(self.config.data, self.config.eval_data)
        if self.config.data is None:
            train_text += "\n" + read_corpus(NARRATIVE_TEXT)
            self.data_source += f" + {NARRATIVE_TEXT.name}"
        train = sentences(train_text)
        held = sentences(held_text) if held_text is not None else []
        if held_text is None:
            cut = max(1, round(len(train) * HELDOUT_FRACTION))
            train, held = train[:-cut], train[-cut:]
        self.labelled_eval: list[tuple[str, int]] = []
        if self.config.data is None and self.head_record.get("labels") == list(bundled.SENTIMENT_LABELS):
            # The sentiment head's own training sentences teach its decision boundary; its held-out quarter
            # (as train_head split it) measures accuracy.
            rows = load_rows()
            train = [r["text"] for r in rows if not is_held_out(r)] + train
            self.labelled_eval = [(r["text"], int(r["label"])) for r in rows if is_held_out(r)]
            self.data_source += " + modelserver/data/sentiment.jsonl (train_head's split)"
        if not train or not held:
            raise ValueError("the data has no sentence of at least 12 characters to train on or hold out; "
                             "give a longer --data file")
        self.sentences, self.eval_sentences = train, held[: self.config.batch_size * self.config.eval_batches]
        self.num_examples = len(train)

    def trainable(self) -> nn.Module:
        return self.modules

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encoded], device=self.device)
        mask = torch.tensor([e.attention_mask for e in encoded], device=self.device)
        return ids, mask

    @torch.no_grad()
    def _teacher_targets(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised pooled embeddings, head logits) of the teacher for ``texts``, batch by batch."""
        embeddings, logits = [], []
        for start in range(0, len(texts), self.config.batch_size):
            ids, mask = self._encode(texts[start : start + self.config.batch_size])
            out = self.teacher.encoder(input_ids=ids, attention_mask=mask)
            embeddings.append(F.normalize(mean_pool(out.last_hidden_state, mask), dim=-1))
            logits.append(self.teacher.head(embeddings[-1]))
        return torch.cat(embeddings), torch.cat(logits)

    def _outputs(self, texts: list[str], hidden: bool,
                 targets: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Student outputs and the teacher's for ``texts``; ``targets`` are the teacher's precomputed (embedding,
        logits) rows for them, else the teacher runs here."""
        ids, mask = self._encode(texts)
        t_out = None
        if targets is None:
            with torch.no_grad():
                t_out = self.teacher.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
                t_emb = F.normalize(mean_pool(t_out.last_hidden_state, mask), dim=-1)
                t_logits = self.teacher.head(t_emb)
        else:
            t_emb, t_logits = targets
        s_out = self.student.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=hidden)
        pooled = mean_pool(s_out.last_hidden_state, mask)
        s_logits = self.student.head(F.normalize(pooled, dim=-1))
        cosine = F.cosine_similarity(self.projection(pooled), t_emb, dim=-1)
        return {"t": t_out, "s": s_out, "t_logits": t_logits, "s_logits": s_logits, "cosine": cosine, "mask": mask}

    def loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]:
        config = self.config
        hidden = config.hidden_weight > 0
        targets = None
        if self.train_targets is not None:
            rows = torch.tensor(indices, device=self.device)
            targets = (self.train_targets[0][rows], self.train_targets[1][rows])
        out = self._outputs([self.sentences[i] for i in indices], hidden, targets)
        kd = kd_loss(out["s_logits"], out["t_logits"], config.temperature, config.kd_loss, config.jsd_beta)
        embedding = (1 - out["cosine"]).mean()
        total = kd + config.embedding_weight * embedding
        parts = {"kd": kd.item(), "embedding_loss": embedding.item()}
        if hidden:
            students, teachers = hidden_pairs(out["s"].hidden_states, out["t"].hidden_states, self.layer_map,
                                              config.hidden_layers)
            match = hidden_mse([self.projection(h) for h in students], teachers, out["mask"])
            total = total + config.hidden_weight * match
            parts["hidden_mse"] = match.item()
        parts["loss"] = total.item()
        return total, parts, int(out["mask"].sum())

    def evaluate(self) -> dict[str, float]:
        """Held-out sentences: KD loss, KL, embedding cosine, top-1 agreement; labelled sentiment rows: both
        accuracies and agreement."""
        size, config = self.config.batch_size, self.config
        sums = {"kd": 0.0, "kl": 0.0, "cos": 0.0, "agree": 0.0}
        for start in range(0, len(self.eval_sentences), size):
            rows = slice(start, start + size)
            out = self._outputs(self.eval_sentences[rows], False,
                                (self.eval_targets[0][rows], self.eval_targets[1][rows]))
            n = len(out["cosine"])
            sums["kd"] += float(kd_loss(out["s_logits"], out["t_logits"], config.temperature, config.kd_loss,
                                        config.jsd_beta)) * n
            sums["kl"] += float(kl_to_teacher(out["s_logits"], out["t_logits"])) * n
            sums["cos"] += float(out["cosine"].sum())
            sums["agree"] += float((out["s_logits"].argmax(-1) == out["t_logits"].argmax(-1)).sum())
        count = len(self.eval_sentences)
        record = {"loss": (sums["kd"] + config.embedding_weight * (count - sums["cos"])) / count,
                  "kd_loss": sums["kd"] / count, "kl_to_teacher": sums["kl"] / count,
                  "embedding_cosine": sums["cos"] / count, "top1_agreement": sums["agree"] / count,
                  "eval_sentences": count}
        if self.labelled_eval:
            texts, labels = zip(*self.labelled_eval, strict=True)
            s_pred, t_pred = [], []
            for start in range(0, len(texts), size):
                out = self._outputs(list(texts[start : start + size]), False)
                s_pred += out["s_logits"].argmax(-1).tolist()
                t_pred += out["t_logits"].argmax(-1).tolist()
            n = len(labels)
            record.update(
                student_accuracy=sum(p == y for p, y in zip(s_pred, labels, strict=True)) / n,
                teacher_accuracy=sum(p == y for p, y in zip(t_pred, labels, strict=True)) / n,
                labelled_agreement=sum(a == b for a, b in zip(s_pred, t_pred, strict=True)) / n,
                labelled_sentences=n)
        return record

    def save_student(self, out_dir: Path) -> None:
        """config.json + model.safetensors of the encoder, the teacher's tokenizer files, head.json."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.student.encoder.to("cpu").save_pretrained(str(out_dir), safe_serialization=True)
        self.student.to(self.device)
        for name in ENCODER_TOKENIZER_FILES:
            if (self.teacher_dir / name).is_file():
                shutil.copy2(self.teacher_dir / name, out_dir / name)
        head = self.student.head
        record = {"labels": self.head_record.get("labels"), "encoder": f"distilled from {self.teacher_dir}",
                  "weight": head.weight.detach().cpu().tolist(), "bias": head.bias.detach().cpu().tolist()}
        (out_dir / HEAD_FILE).write_text(json.dumps(record))

    def export(self, out_dir: Path, repository: Path, name: str) -> dict:
        """The model server's export pipeline (ONNX -> onnxslim -> validate against PyTorch) for the saved student."""
        from tokenmill.modelserver.export import hf_export_spec
        from tokenmill.modelserver.pipeline import export_to_repository

        spec = hf_export_spec(out_dir, head_path=out_dir / HEAD_FILE)
        return export_to_repository(name, repository, spec=spec, variants=())

    def describe(self) -> dict:
        enc = self.student.encoder.config
        return {"teacher": str(self.teacher_dir), "teacher_params": self.teacher_params,
                "student_params": self.student_params, "student_layers": enc.num_hidden_layers,
                "student_hidden_size": enc.hidden_size, "student_intermediate_size": enc.intermediate_size,
                "teacher_layers": self.teacher.encoder.config.num_hidden_layers,
                "layer_map": None if self.config.student else self.layer_map,  # --student: its own weights
                "init": self.init_report, "word_embeddings": "frozen" if self.freeze_word_embeddings else "trained",
                "data": self.data_source, "train_sentences": len(self.sentences),
                "eval_sentences": len(self.eval_sentences), "labelled_eval": len(self.labelled_eval)}
