"""Training the EAGLE draft head (eagle_head.py) on cached teacher features (eagle_data.py).

At position t the head reads (x_{t+1}, f_t) and is trained, on the answer positions, to regress f_{t+1} (smooth
L1, EAGLE-1's "feature" loss) and to match the teacher's next-token distribution softmax(head(f_{t+1})) (forward
KL over the draft vocabulary's rows; EAGLE-1's "token" loss). Uniform noise on the input features (EAGLE-1) lets
the head read its own, imperfect predictions when it drafts several tokens. ``unroll 2`` adds a second pass whose
inputs are the first pass's predicted features (a cheap form of EAGLE-3's training-time test), so the head also
learns the second draft step on its own outputs.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tokenmill.distill.eagle_data import FeatureSet
from tokenmill.distill.eagle_head import EagleHead


@dataclass(frozen=True)
class EagleTrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences
    lr: float = 3e-4
    warmup_steps: int = 20
    feature_weight: float = 1.0
    token_weight: float = 0.1  # EAGLE-1's weights
    noise: float = 0.1  # uniform noise, +-noise x the features' RMS
    unroll: int = 1
    prompt_positions: bool = False  # also learn the teacher's features/distributions over the prompts' tokens
    seed: int = 0
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if self.unroll not in (1, 2):
            raise ValueError(f"unroll must be 1 or 2; got {self.unroll}")


def pad_batch(data: FeatureSet, indices: list[int],
              prompt_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], features [B, L, h] fp32, loss mask [B, L] (True where the id is an answer token, or any but the
    first with ``prompt_positions``), right-padded (causal attention never lets a real position see the padding
    after it)."""
    seqs = [data.sequence(i) for i in indices]
    length = max(s[0].numel() for s in seqs)
    hidden = data.features.shape[1]
    ids = torch.zeros(len(seqs), length, dtype=torch.int64)
    feats = torch.zeros(len(seqs), length, hidden)
    answer = torch.zeros(len(seqs), length, dtype=torch.bool)
    for row, (i, f, p) in enumerate(seqs):
        ids[row, : i.numel()], feats[row, : i.numel()] = i, f.float()
        answer[row, 1 if prompt_positions else p : i.numel()] = True
    return ids, feats, answer


def head_logits(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return features @ rows.T


def step_losses(head: EagleHead, rows: torch.Tensor, ids: torch.Tensor, feats: torch.Tensor, answer: torch.Tensor,
                noise: float, unroll: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """Feature (smooth L1) and token (KL) losses, averaged over positions t whose target token x_{t+2} is an
    answer token (the positions a draft proposes at). ``rows``: the LM head rows the KL is over."""
    inputs, targets = feats[:, :-1], feats[:, 1:]
    if noise > 0:
        rms = feats.pow(2).mean().sqrt()
        u = torch.rand(inputs.shape, generator=generator) if generator is not None else torch.rand_like(inputs)
        inputs = inputs + (u * 2 - 1) * noise * rms
    mask = answer[:, 2:]  # position t predicts x_{t+2}
    pred = head(ids[:, 1:], inputs)  # [B, L-1, h]: f_{t+1}
    out = {"feature": torch.zeros(()), "token": torch.zeros(())}
    for depth in range(unroll):
        p, tgt, m = pred[:, : mask.shape[1]], targets[:, : mask.shape[1]], mask
        if depth:  # pass 2: input (x_{t+2}, predicted f_{t+1}) -> f_{t+2}, the token x_{t+3}
            pred = head(ids[:, 2:], pred[:, :-1])
            p, tgt, m = pred[:, :-1], targets[:, 1:-1], mask[:, 1:]
        w = m.float()
        n = w.sum().clamp(min=1)
        feat_loss = (F.smooth_l1_loss(p, tgt, reduction="none").mean(-1) * w).sum() / n
        with torch.no_grad():
            teacher = F.log_softmax(head_logits(tgt, rows), -1)
        draft = F.log_softmax(head_logits(p, rows), -1)
        token_loss = ((teacher.exp() * (teacher - draft)).sum(-1) * w).sum() / n
        out["feature"] = out["feature"] + feat_loss / unroll
        out["token"] = out["token"] + token_loss / unroll
    return out


def lr_at(step: int, c: EagleTrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of lr."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps)
    return c.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def teacher_forced_agreement(head: EagleHead, data: FeatureSet, rows_ids: torch.Tensor | None,
                             batch_size: int = 16) -> dict[str, float]:
    """Top-1 agreement of the head's first draft token (true features in) with the teacher's next token, on the
    answer positions: over the draft vocabulary's rows (``rows_ids``) and over the whole head."""
    hits_sub = hits_full = total = 0
    for lo in range(0, len(data), batch_size):
        ids, feats, answer = pad_batch(data, list(range(lo, min(len(data), lo + batch_size))))
        pred = head(ids[:, 1:], feats[:, :-1])[:, :-1]
        mask, target = answer[:, 2:], ids[:, 2:]
        full = head_logits(pred, head.lm_head).argmax(-1)
        hits_full += int(((full == target) & mask).sum())
        if rows_ids is not None:
            sub = rows_ids[head_logits(pred, head.lm_head[rows_ids]).argmax(-1)]
            hits_sub += int(((sub == target) & mask).sum())
        total += int(mask.sum())
    result = {"top1_agreement_full_vocab": hits_full / max(1, total), "positions": total}
    if rows_ids is not None:
        result["top1_agreement_draft_vocab"] = hits_sub / max(1, total)
    return result


def train(head: EagleHead, data: FeatureSet, c: EagleTrainConfig, rows_ids: torch.Tensor | None,
          heldout: FeatureSet | None = None, log=print, on_eval=None, deadline: float | None = None) -> dict:
    """Train ``head`` in place; returns the history (per-step losses, evaluations, seconds). ``on_eval(step,
    head)`` may add entries to an evaluation's record (a checkpoint, a replayed acceptance); past ``deadline``
    (``time.time()``) training stops early, evaluated, and the history says so."""
    torch.manual_seed(c.seed)
    generator = torch.Generator().manual_seed(c.seed)
    rows = head.lm_head if rows_ids is None else head.lm_head[rows_ids].clone()
    params = head.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
    order: list[int] = []
    history: dict = {"config": asdict(c), "steps": [], "evals": []}
    started = time.perf_counter()

    def evaluate(step: int) -> None:
        if heldout is not None:
            head.eval()
            record = {"step": step, "seconds": round(time.perf_counter() - started, 1),
                      **teacher_forced_agreement(head, heldout, rows_ids)}
            if on_eval is not None:
                record.update(on_eval(step, head))
            head.train()
            history["evals"].append(record)
            log(f"eval {record}")

    head.train()
    evaluate(0)
    done = c.steps
    for step in range(c.steps):
        if deadline is not None and time.time() > deadline:
            done = step
            history["stopped_early_at_step"] = step
            log(f"deadline: stopped at step {step} of {c.steps}")
            break
        if len(order) < c.batch_size:
            order += torch.randperm(len(data), generator=generator).tolist()
        batch, order = order[: c.batch_size], order[c.batch_size :]
        ids, feats, answer = pad_batch(data, batch, c.prompt_positions)
        losses = step_losses(head, rows, ids, feats, answer, c.noise, c.unroll, generator)
        loss = c.feature_weight * losses["feature"] + c.token_weight * losses["token"]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history["steps"].append({"step": step + 1, "loss": round(loss.item(), 5),
                                 "feature": round(losses["feature"].item(), 5),
                                 "token": round(losses["token"].item(), 5)})
        if (step + 1) % 20 == 0:
            log(f"step {step + 1}/{c.steps} {history['steps'][-1]} {time.perf_counter() - started:.0f} s")
        if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < c.steps:
            evaluate(step + 1)
    evaluate(done)
    head.eval()
    history["seconds"] = round(time.perf_counter() - started, 1)
    return history
