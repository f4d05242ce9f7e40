"""Knowledge-distillation losses: KL between softened teacher and student distributions (forward, reverse,
generalized JSD), scaled by T² so gradients keep their size across temperatures (Hinton et al., 2015), and
hidden-state matching."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            kind: str = "forward_kl", beta: float = 0.5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows (the last dim is the vocabulary / classes) of the chosen divergence at ``temperature``,
    times T². forward_kl = KL(teacher || student) (mode covering, the usual choice); reverse_kl =
    KL(student || teacher) (mode seeking); jsd = beta-weighted generalized Jensen-Shannon (GKD, Agarwal et al.)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_row = (t.exp() * (t - s)).sum(-1)
    elif kind == "reverse_kl":
        per_row = (s.exp() * (s - t)).sum(-1)
    elif kind == "jsd":
        # log of the mixture beta * p_t + (1 - beta) * p_s, in log space for stability
        mixture = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        per_row = beta * (t.exp() * (t - mixture)).sum(-1) + (1 - beta) * (s.exp() * (s - mixture)).sum(-1)
    else:
        raise ValueError(f"kd loss {kind!r} must be forward_kl, reverse_kl or jsd")
    return _masked_mean(per_row, mask) * temperature**2


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) at temperature 1: the evaluation metric (nats per row)."""
    return kd_loss(student_logits, teacher_logits, 1.0, "forward_kl", mask=mask)


def hidden_mse(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over matched pairs of the per-position MSE between hidden states (same width)."""
    losses = [_masked_mean(((s.float() - t.float()) ** 2).mean(-1), mask)
              for s, t in zip(student_hidden, teacher_hidden, strict=True)]
    return torch.stack(losses).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)
