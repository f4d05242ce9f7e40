"""Training the EAGLE draft head (eagle_head.py) on cached teacher features (eagle_data.py), and measuring it in
batches.

At position t the head reads (x_{t+1}, f_t) and is trained, on the answer positions, to regress f_{t+1} (smooth
L1, EAGLE-1's "feature" loss) and to match the teacher's next-token distribution softmax(head(f_{t+1})) (forward
KL over the draft vocabulary's rows; EAGLE-1's "token" loss). Uniform noise on the input features (EAGLE-1) lets
the head read its own, imperfect predictions when it drafts several tokens. ``unroll n`` also trains draft steps
2..n on the head's own predicted features with the attention drafting sees (``draft_passes``: EAGLE-3's
training-time test), so the later steps of a round learn from their real inputs (less exposure bias). The same
passes give every round's accepted drafts at once (``draft_acceptance``: ``eagle_reference.replay``, batched).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tokenmill.distill.config import MAX_UNROLL
from tokenmill.distill.eagle_data import FeatureSet
from tokenmill.distill.eagle_head import EagleHead, KVCache


@dataclass(frozen=True)
class EagleTrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences
    lr: float = 3e-4
    warmup_steps: int = 20
    feature_weight: float = 1.0
    token_weight: float = 0.1  # EAGLE-1's weights
    noise: float = 0.1  # uniform noise, +-noise x the features' RMS
    unroll: int = 1  # draft steps trained per position (1: EAGLE-1; 2+: the later steps on the head's own features)
    prompt_positions: bool = False  # also learn the teacher's features/distributions over the prompts' tokens
    seed: int = 0
    eval_every: int = 0
    bf16: bool = False  # autocast the head (CUDA); the teacher's distribution stays fp32

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if not 1 <= self.unroll <= MAX_UNROLL:
            raise ValueError(f"unroll must be 1..{MAX_UNROLL}; got {self.unroll}")


def pad_batch(data: FeatureSet, indices: range | list[int],
              prompt_positions: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], features [B, L, h] fp32, loss mask [B, L] (True where the id is an answer token, or any but the
    first with ``prompt_positions``), right-padded (causal attention never lets a real position see the padding
    after it), on the data's device: one gather, not a copy per sequence."""
    device = data.ids.device
    index = torch.as_tensor(list(indices), dtype=torch.int64, device=device)
    starts = data.offsets.to(device)[index]
    lengths = data.offsets.to(device)[index + 1] - starts
    positions = torch.arange(int(lengths.max()), device=device)
    valid = positions[None] < lengths[:, None]
    gather = (starts[:, None] + positions[None]).clamp(max=data.ids.numel() - 1)
    ids = torch.where(valid, data.ids[gather], 0)
    feats = data.features[gather].float() * valid[..., None]
    first = torch.ones_like(lengths) if prompt_positions else data.prompt_lens.to(device)[index]
    return ids, feats, valid & (positions[None] >= first[:, None])


def head_logits(features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return features @ rows.T


def draft_passes(head: EagleHead, next_ids: torch.Tensor, features: torch.Tensor, passes: int) -> list[torch.Tensor]:
    """The head's predicted features [B, T, h] for draft steps 1..``passes`` at every position. Pass 0 reads the
    true ``features`` (f_t with x_{t+1} = ``next_ids``). Pass d at position i reads (x_{i+1}, pass d-1's prediction
    at i-1) and attends to pass-0 keys at positions <= i-d and to pass e's key at position i-d+e (e = 1..d): exactly
    draft step d+1 of a round whose head cache holds positions 0..i-d (read with the target's true features), given
    that drafts 1..d were right (only then does the round reach step d+1). The diagonal key (e = d) is always
    there, so no row is empty."""
    cache = KVCache() if passes > 1 else None
    preds = [head(next_ids, features, 0, cache)]
    position = torch.arange(next_ids.shape[1], device=next_ids.device)
    for depth in range(1, passes):
        # position 0 has no predecessor (never scored); autocast may hand back bf16 predictions
        shifted = torch.cat([features[:, :1], preds[-1][:, :-1].to(features.dtype)], 1)
        blocks = [position[None] <= position[:, None] - depth]
        blocks += [position[None] == position[:, None] - depth + e for e in range(1, depth + 1)]
        preds.append(head(next_ids, shifted, 0, cache, torch.cat(blocks, 1)))
    return preds


def step_losses(head: EagleHead, rows: torch.Tensor, ids: torch.Tensor, feats: torch.Tensor, answer: torch.Tensor,
                noise: float, unroll: int, generator: torch.Generator | None,
                bf16: bool = False) -> dict[str, torch.Tensor]:
    """Feature (smooth L1) and token (KL) losses, averaged over positions t whose target token x_{t+2} is an
    answer token (the positions a draft proposes at) and over the ``unroll`` draft steps. ``rows``: the LM head
    rows the KL is over. Every step targets the same f_{t+1}: pass d at t is draft step d+1 proposing x_{t+2}."""
    inputs, targets = feats[:, :-1], feats[:, 1:]
    if noise > 0:
        rms = feats.pow(2).mean().sqrt()
        u = (torch.rand(inputs.shape, generator=generator, device=inputs.device) if generator is not None
             else torch.rand_like(inputs))
        inputs = inputs + (u * 2 - 1) * noise * rms
    mask = answer[:, 2:]  # position t predicts x_{t+2}
    length = mask.shape[1]
    # fp32 whatever the autocast (the Trainer's too): the distribution every step is pulled towards
    with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
        teacher = F.log_softmax(head_logits(targets[:, :length], rows.float()), -1)
        teacher_p = teacher.exp()
    position = torch.arange(length, device=ids.device)
    out = {"feature": torch.zeros((), device=ids.device), "token": torch.zeros((), device=ids.device)}
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        preds = draft_passes(head, ids[:, 1:], inputs, unroll)
        for depth, pred in enumerate(preds):
            p = pred[:, :length]
            w = (mask & (position >= depth)).float()
            n = w.sum().clamp(min=1)
            feat_loss = (F.smooth_l1_loss(p.float(), targets[:, :length], reduction="none").mean(-1) * w).sum() / n
            draft = F.log_softmax(head_logits(p, rows).float(), -1)
            token_loss = ((teacher_p * (teacher - draft)).sum(-1) * w).sum() / n
            out["feature"] = out["feature"] + feat_loss / unroll
            out["token"] = out["token"] + token_loss / unroll
    return out


def lr_at(step: int, c: EagleTrainConfig, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 10% of lr; ``progress`` (0..1, e.g. of a time budget) instead of the
    step count when given."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if progress is None:
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
            sub = rows_ids.to(pred.device)[head_logits(pred, head.lm_head[rows_ids]).argmax(-1)]
            hits_sub += int(((sub == target) & mask).sum())
        total += int(mask.sum())
    result = {"top1_agreement_full_vocab": hits_full / max(1, total), "positions": total}
    if rows_ids is not None:
        result["top1_agreement_draft_vocab"] = hits_sub / max(1, total)
    return result


def replay_rounds(leading: list[int], prompt_len: int, end: int, k: int) -> list[int]:
    """Tokens per round of greedy drafting with k drafts, given ``leading[c]``: how many drafts in a row a round
    whose accepted prefix is ids[:c+1] gets right (``eagle_reference.replay``'s walk, with its acceptance rule)."""
    m, lengths = prompt_len, []
    while m < end - 1:
        remaining = end - 1 - m
        step = min(min(leading[m], k, remaining) + 1, remaining)
        lengths.append(step)
        m += step
    return lengths


@torch.no_grad()
def draft_acceptance(head: EagleHead, data: FeatureSet, ks: list[int], rows_ids: torch.Tensor | None = None,
                     batch_size: int = 16, deadline: float | None = None) -> dict:
    """Acceptance length at each k of ``ks`` over the sequences of ``data`` (the same rounds as
    ``eagle_reference.replay`` on each, up to rounding where a draft's top two logits tie), from ``max(ks)``
    batched ``draft_passes`` instead of one head call per draft; sequences after ``deadline`` (``time.time()``)
    are left out and counted."""
    depth = max(ks)
    rows = head.lm_head if rows_ids is None else head.lm_head[rows_ids]
    lengths: dict[int, list[int]] = {k: [] for k in ks}
    done = 0
    for lo in range(0, len(data), batch_size):
        if deadline is not None and time.time() > deadline:
            break
        indices = list(range(lo, min(len(data), lo + batch_size)))
        ids, feats, _ = pad_batch(data, indices)
        preds = draft_passes(head, ids[:, 1:], feats[:, :-1], depth)
        drafts = torch.stack([head_logits(p, rows).argmax(-1) for p in preds])  # [depth, B, L-1]
        if rows_ids is not None:
            drafts = rows_ids.to(drafts.device)[drafts]
        drafts, ids = drafts.cpu(), ids.cpu()
        for row, i in enumerate(indices):
            end, prompt_len = int(data.offsets[i + 1] - data.offsets[i]), int(data.prompt_lens[i])
            # hit[j][c]: draft j+1 of a round with prefix ids[:c+1] (pass j at position c-1+j) equals ids[c+1+j]
            leading = torch.zeros(end, dtype=torch.int64)
            alive = torch.ones(end, dtype=torch.bool)
            for j in range(depth):
                c = torch.arange(1, end - 1 - j)
                hit = torch.zeros(end, dtype=torch.bool)
                hit[c] = drafts[j, row, c - 1 + j] == ids[row, c + 1 + j]
                alive &= hit
                leading += alive
            for k in ks:
                lengths[k] += replay_rounds(leading.tolist(), prompt_len, end, k)
        done += len(indices)
    out: dict = {"sequences": done, "sequences_left_out": len(data) - done}
    for k in ks:
        out[f"k{k}"] = {"mean_acceptance_length": round(sum(lengths[k]) / max(1, len(lengths[k])), 4),
                        "rounds": len(lengths[k])}
    return out


def train(head: EagleHead, data: FeatureSet, c: EagleTrainConfig, rows_ids: torch.Tensor | None,
          heldout: FeatureSet | None = None, log=print, on_eval=None, deadline: float | None = None,
          seconds: float | None = None) -> dict:
    """Train ``head`` in place on ``data``'s device; returns the history (per-step losses, evaluations, seconds).
    ``on_eval(step, head)`` may add entries to an evaluation's record (a checkpoint, a replayed acceptance); past
    ``deadline`` (``time.time()``) training stops early, evaluated, and the history says so. ``seconds``: train
    for that long (at most ``c.steps``), the cosine schedule following the clock rather than the step count."""
    torch.manual_seed(c.seed)
    device = data.ids.device
    generator = torch.Generator().manual_seed(c.seed)  # the batch order
    noise_generator = torch.Generator(device=device).manual_seed(c.seed)
    rows = head.lm_head if rows_ids is None else head.lm_head[rows_ids.to(device)].clone()
    params = head.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
    order: list[int] = []
    history: dict = {"config": asdict(c), "steps": [], "evals": []}
    started = time.perf_counter()
    if seconds is not None:
        deadline = min(deadline or math.inf, time.time() + seconds)

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
        losses = step_losses(head, rows, ids, feats, answer, c.noise, c.unroll, noise_generator, c.bf16)
        loss = c.feature_weight * losses["feature"] + c.token_weight * losses["token"]
        progress = None if seconds is None else (time.perf_counter() - started) / seconds
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, c, progress)
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
