"""``--target eagle``: an EAGLE-1 draft head (eagle_head.py) for the teacher, trained by the shared loop (trainer.py)
on the teacher's own answers (teacher_data.teacher_answers: generated with tokenmill's engine, cached) and the
teacher's features over them (eagle_data.batched_features, computed once); the losses and measurements are
eagle_train.py's. Saved as a head directory ``{"method": "eagle", "model": OUT}`` loads unchanged.

benchmarks/gpu_eagle.py builds the same task from answers and features it makes on its own clock
(``EagleData``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.distill.config import DistillConfig
from tokenmill.distill.eagle_data import FeatureSet, batched_features
from tokenmill.distill.eagle_head import EagleHead
from tokenmill.distill.eagle_train import draft_acceptance, pad_batch, step_losses, teacher_forced_agreement
from tokenmill.spec_decode.draft_vocab import (
    check_draft_vocab_size,
    count_token_ids,
    rank_token_ids,
    write_draft_vocab,
)

EVAL_K = 4  # the held-out acceptance length each evaluation reports (issue 24's target is k = 4)


@dataclass
class EagleData:
    """What the head trains on: the fp32 transformers teacher (its embedding, LM head, last layer and final norm), the
    features of its training and held-out answers (on the training device), and where they came from."""

    teacher: nn.Module
    teacher_source: str
    train: FeatureSet
    held_out: FeatureSet
    source: str
    features_check: dict | None = None


def load_eagle_data(config: DistillConfig, log=print) -> EagleData:
    """The CLI's data: the teacher's answers to ``--teacher-generated`` prompts (the cache reused and extended), then
    its features over them on ``--device``."""
    from tokenmill.distill.llm import load_teacher
    from tokenmill.distill.teacher_data import teacher_answers

    teacher, _, teacher_source = load_teacher(config.teacher)
    check_eagle_teacher(teacher, teacher_source)
    if config.draft_vocab_size is not None:
        check_draft_vocab_size(config.draft_vocab_size, teacher.config.vocab_size)
    train, held, source = teacher_answers(config, log=log)
    teacher = teacher.to(config.device)
    train_set, _, check = batched_features(teacher, train, config.device)
    held_set, _, held_check = batched_features(teacher, held, config.device)
    return EagleData(teacher, teacher_source, train_set, held_set, source,
                     {"train": check, "held_out": held_check})


def check_eagle_teacher(teacher: nn.Module, source: str) -> None:
    """The head copies the teacher's last layer into a Llama decoder layer: refuse other layer layouts (biases,
    q/k norms, other activations) before any answer is generated."""
    from tokenmill.distill.eagle_head import DecoderLayer, EagleConfig

    config = EagleConfig.from_target(teacher.config)  # refuses RoPE scaling with a clear error
    expected = set(DecoderLayer(config).state_dict())
    found = {k for k in teacher.model.layers[-1].state_dict() if "rotary" not in k}
    act = getattr(teacher.config, "hidden_act", "silu")
    if found != expected or act != "silu":
        raise ValueError(f"teacher {source!r} ({type(teacher).__name__}) has no Llama decoder layer the EAGLE head can "
                         f"start from (extra tensors {sorted(found - expected)[:3]}, missing "
                         f"{sorted(expected - found)[:3]}, activation {act}); --target eagle supports Llama-family "
                         "teachers")


def answer_token_counts(data: FeatureSet, vocab_size: int) -> torch.Tensor:
    """How often each id is an answer token of ``data``: the ranking of a reduced draft vocabulary."""
    ids, offsets, prompt_lens = data.ids.cpu(), data.offsets.tolist(), data.prompt_lens.tolist()
    return count_token_ids([ids[offsets[i] + prompt_lens[i] : offsets[i + 1]] for i in range(len(data))], vocab_size)


class EagleTask:
    """The head (student) over cached teacher features; examples are answer sequences."""

    def __init__(self, config: DistillConfig, data: EagleData | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        data = data if data is not None else load_eagle_data(
            config, log=lambda line: print(line, flush=True) if config.progress else None)
        if len(data.train) == 0 or len(data.held_out) == 0:
            raise ValueError("--target eagle needs at least one training and one held-out answer")
        teacher = data.teacher
        self.teacher_source, self.data_source, self.features_check = data.teacher_source, data.source, \
            data.features_check
        self.teacher_params = sum(p.numel() for p in teacher.parameters())
        self.teacher_layers = teacher.config.num_hidden_layers
        torch.manual_seed(config.seed)  # the input noise's draws follow --seed (and resume with the RNG state)
        self.head = EagleHead.from_target(teacher).to(self.device)
        self.head.norm.requires_grad_(False)  # the target's final norm: what its LM head reads
        self.train_set, self.held_out = data.train, data.held_out
        self.num_examples = len(self.train_set)
        size = config.batch_size * config.eval_batches
        self.eval_set = self.held_out if len(self.held_out) <= size else self.held_out.subset(range(size))
        vocab = teacher.config.vocab_size
        self.vocab_counts: torch.Tensor | None = None
        self.rows_ids: torch.Tensor | None = None  # the draft vocabulary's ids (None: the whole LM head)
        if config.draft_vocab_size is not None:
            check_draft_vocab_size(config.draft_vocab_size, vocab)
            self.vocab_counts = answer_token_counts(self.train_set, vocab)
            self.rows_ids = rank_token_ids(self.vocab_counts)[: config.draft_vocab_size].to(self.device)
        self.rows = self.head.lm_head if self.rows_ids is None else self.head.lm_head[self.rows_ids].clone()

    @property
    def student(self) -> nn.Module:
        return self.head

    def trainable(self) -> nn.Module:
        return self.head

    def _losses(self, data: FeatureSet, indices: list[int], noise: float) -> tuple[dict[str, torch.Tensor], int]:
        ids, feats, answer = pad_batch(data, indices, self.config.prompt_positions)
        bf16 = torch.is_autocast_enabled(self.device.type)  # the Trainer's autocast reaches the head's passes
        losses = step_losses(self.head, self.rows, ids, feats, answer, noise, self.config.unroll, None, bf16)
        return losses, int(answer[:, 2:].sum())

    def loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]:
        losses, positions = self._losses(self.train_set, indices, self.config.feature_noise)
        total = self.config.feature_weight * losses["feature"] + self.config.token_weight * losses["token"]
        return total, {"loss": total.item(), "feature": losses["feature"].item(),
                       "token": losses["token"].item()}, positions

    def evaluate(self) -> dict[str, float]:
        """Held-out (the first ``--eval-batches`` x ``--batch-size`` held-out answers): the training loss without
        noise, its feature and token (KL to the teacher) terms, top-1 agreement of the first draft with the teacher's
        next token, and the acceptance length at k = 4 (eagle_train.draft_acceptance: eagle_reference.replay
        batched)."""
        sums = {"loss": 0.0, "feature_loss": 0.0, "kl_to_teacher": 0.0}
        positions = 0
        size = self.config.batch_size
        for lo in range(0, len(self.eval_set), size):
            losses, n = self._losses(self.eval_set, list(range(lo, min(len(self.eval_set), lo + size))), 0.0)
            feature, token = float(losses["feature"]), float(losses["token"])
            sums["loss"] += (self.config.feature_weight * feature + self.config.token_weight * token) * n
            sums["feature_loss"] += feature * n
            sums["kl_to_teacher"] += token * n
            positions += n
        record = {k: v / max(1, positions) for k, v in sums.items()}
        agreement = teacher_forced_agreement(self.head, self.eval_set, self.rows_ids, size)
        record["top1_agreement"] = agreement.get("top1_agreement_draft_vocab", agreement["top1_agreement_full_vocab"])
        record["top1_agreement_full_vocab"] = agreement["top1_agreement_full_vocab"]
        accepted = draft_acceptance(self.head, self.eval_set, [EVAL_K], self.rows_ids, size)[f"k{EVAL_K}"]
        record[f"acceptance_length_k{EVAL_K}"] = accepted["mean_acceptance_length"]
        record["eval_positions"] = positions
        return record

    def save_student(self, out_dir: Path) -> None:
        """config.json + model.safetensors (fp32: fc, the layer, the teacher's final norm) + draft_vocab.json with
        ``--draft-vocab-size``: what ``{"method": "eagle", "model": out_dir}`` loads."""
        self.head.save(out_dir, self.config.draft_vocab_size)
        if self.vocab_counts is not None:
            write_draft_vocab(out_dir, self.vocab_counts, self.config.draft_vocab_size)

    def describe(self) -> dict:
        c = self.head.config
        return {"teacher": self.teacher_source, "teacher_params": self.teacher_params,
                "student_params": sum(p.numel() for p in self.head.parameters()), "student_layers": 1,
                "student_hidden_size": c.hidden_size, "teacher_layers": self.teacher_layers,
                "init": f"layer and final norm copied from teacher layer {self.teacher_layers - 1}, fc = [I | I]",
                "data": self.data_source, "train_answers": len(self.train_set), "held_out_answers": len(self.held_out),
                "eval_answers": len(self.eval_set), "train_tokens": int(self.train_set.ids.numel()),
                "draft_vocab_size": self.config.draft_vocab_size, "features_check": self.features_check}
