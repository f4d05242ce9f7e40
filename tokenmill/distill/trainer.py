"""The training loop every target shares: AdamW, linear warm-up + cosine decay, gradient accumulation, bf16
autocast on CUDA, gradient clipping, periodic held-out evaluation, and checkpoints that resume bit-exactly
(student + optimizer + schedule + RNG state + data position)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from tokenmill.distill.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from tokenmill.distill.config import RESUME_FIELDS, DistillConfig
from tokenmill.distill.data import BatchOrder

MIN_LR_RATIO = 0.1  # cosine decays to a tenth of --lr, not to zero, so the last steps still move


class DistillTask(Protocol):
    """What a target gives the loop: the student, the trainable modules, a loss per batch of example indices,
    a held-out evaluation and a way to save the student."""

    student: nn.Module
    num_examples: int

    def trainable(self) -> nn.Module: ...  # the student plus any training-only modules (projections)

    def loss(self, indices: list[int]) -> tuple[torch.Tensor, dict[str, float], int]: ...  # loss, parts, tokens

    def evaluate(self) -> dict[str, float]: ...

    def save_student(self, out_dir: Path) -> None: ...


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


class Trainer:
    def __init__(self, task: DistillTask, config: DistillConfig) -> None:
        self.task, self.config = task, config
        self.device = torch.device(config.device)
        params = [p for p in task.trainable().parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, config.warmup_steps, config.steps))
        self.order = BatchOrder(task.num_examples, config.batch_size, config.seed)
        self.step = 0
        self.history: list[dict] = []  # one record per optimizer step
        self.evals: list[dict] = []  # held-out metrics, with the step they were taken at

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.device.type == "cpu" and self.config.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def data_position(self) -> int:
        """Batches consumed so far (the next one read is this index)."""
        return self.step * self.config.grad_accum

    def evaluate(self) -> dict:
        self.task.trainable().eval()
        with torch.no_grad(), self.autocast():
            record = dict(self.task.evaluate(), step=self.step)
        self.evals.append(record)
        return record

    def resume(self, where: str) -> Path:
        path = find_checkpoint(self.config.checkpoint_root, where)
        state = load_checkpoint(path)
        saved = state["config"]
        for name in RESUME_FIELDS:
            if saved.get(name) != getattr(self.config, name):
                raise ValueError(f"--resume: the checkpoint was trained with {name}={saved.get(name)!r} but this run "
                                 f"has {name}={getattr(self.config, name)!r}; resume with the same arguments")
        self.task.trainable().load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        if state["data_position"] != self.data_position:
            raise ValueError(f"checkpoint {path} is inconsistent: data position {state['data_position']} "
                             f"does not match step {self.step}")
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        return path

    def save(self) -> Path:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        state = {"trainable": self.task.trainable().state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": rng, "step": self.step,
                 "data_position": self.data_position, "history": self.history, "evals": self.evals,
                 "config": self.config.to_dict()}
        return save_checkpoint(self.config.checkpoint_root, self.step, state)

    def _micro_batches(self) -> Iterator[list[int]]:
        for micro in range(self.config.grad_accum):
            yield self.order.indices(self.data_position + micro)

    def train_step(self) -> dict:
        started = time.perf_counter()
        self.task.trainable().train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        tokens = 0
        for indices in self._micro_batches():
            with self.autocast():
                loss, parts, count = self.task.loss(indices)
            (loss / self.config.grad_accum).backward()
            tokens += count
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value / self.config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for group in self.optimizer.param_groups for p in group["params"]], self.config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - started
        record = dict(totals, step=self.step, lr=lr, grad_norm=float(grad_norm), tokens=tokens,
                      seconds=round(seconds, 4), tokens_per_s=tokens / seconds)
        self.history.append(record)
        return record

    def train(self, stop_after: int | None = None) -> None:
        """Run to ``config.steps`` (or stop after step ``stop_after``, checkpointing there: used to test resume)."""
        from tqdm import tqdm

        config = self.config
        if not self.evals:
            self.evaluate()
        last = config.steps if stop_after is None else min(stop_after, config.steps)
        with tqdm(total=config.steps, initial=self.step, desc=f"distill {config.target}", unit="step",
                  disable=not config.progress) as bar:
            while self.step < last:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                    self.evaluate()
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < last:
                    self.save()
        if self.step == config.steps and self.evals[-1]["step"] != self.step:
            self.evaluate()
        self.save()
