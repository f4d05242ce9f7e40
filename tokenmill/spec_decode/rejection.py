"""Rejection sampling of a verification row against the draft's distribution (Leviathan et al. 2023, Chen et al.
2023): draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the token is drawn
from max(0, p_i - q_i) renormalised, and after k acceptances a bonus token is drawn from p_k. The emitted tokens
then follow the target distribution p exactly, whatever q is, provided each d_i was drawn from q_i.

For a point-mass q (n-gram drafts, greedy draft models) this is the same as drawing t_i ~ p_i and accepting while
t_i == d_i, which is what ``sampling/acceptance.py`` does on the sampler's ordinary draws; this module serves
draft models that sample their drafts. Everything stays on the device (no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sampling.sampler import SamplingRow, exponential_noise, filtered_logits


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of ``probs`` (the exponential race argmax(p / E), E ~ Exponential(1))."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def rejection_sample_batch(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor,
                           uniform: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rows of equal k at once: ``target_probs`` [N, k + 1, V], ``draft_token_ids`` [N, k], ``draft_probs``
    [N, k, V], ``uniform`` [N, k] in [0, 1), ``noise`` [N, k + 1, V] Exponential(1). Returns [N, k + 1] ids: the
    accepted drafts, then the resampled or bonus token, then filler (the drafts) that ``accept_drafts`` never
    reaches — on a rejection the resampled id differs from the rejected draft, since max(0, p - q) is 0 there."""
    n, k = draft_token_ids.shape
    if target_probs.shape[:2] != (n, k + 1) or draft_probs.shape[:2] != (n, k):
        raise ValueError(f"{k} drafts need target_probs [N, {k + 1}, V] and draft_probs [N, {k}, V]; got "
                         f"{tuple(target_probs.shape)} and {tuple(draft_probs.shape)}")
    target_probs, draft_probs = target_probs.float(), draft_probs.float()
    drafts = draft_token_ids.long()
    p = target_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)
    q = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)
    rejected = uniform * q > p  # u > p / q without dividing by a q the draft could not have drawn from
    residual = (target_probs[:, :k] - draft_probs).clamp_min_(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # mass 0 means p == q there, where nothing is ever rejected; p keeps the division finite.
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), target_probs[:, :k])
    candidates = (torch.cat([residual, target_probs[:, k:]], dim=1) / noise).argmax(dim=-1)  # [N, k + 1]
    # First rejected position per row, or k (all accepted: the bonus token).
    first = torch.where(rejected.any(dim=1), rejected.int().argmax(dim=1), k)
    out = torch.cat([drafts, drafts[:, -1:]], dim=1)
    rows = torch.arange(n, device=out.device)
    out[rows, first] = candidates[rows, first]
    return out


def rejection_sample(target_probs: torch.Tensor, draft_token_ids: torch.Tensor, draft_probs: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """One row: ``target_probs`` [k + 1, V] (the target's processed distribution after each prefix),
    ``draft_token_ids`` [k], ``draft_probs`` [k, V] (what each draft was drawn from); randoms from ``generator``
    (a seeded request's own). Returns k + 1 ids as ``rejection_sample_batch``."""
    k = draft_token_ids.shape[0]
    if k == 0:
        return _draw(target_probs.float(), generator)
    if target_probs.shape[0] != k + 1 or draft_probs.shape[0] != k:
        raise ValueError(f"{k} drafts need target_probs [{k + 1}, V] and draft_probs [{k}, V]; got "
                         f"{tuple(target_probs.shape)} and {tuple(draft_probs.shape)}")
    device = target_probs.device
    uniform = torch.rand(1, k, generator=generator, device=device)
    noise = torch.empty((1, *target_probs.shape), device=device).exponential_(generator=generator)
    return rejection_sample_batch(target_probs[None], draft_token_ids[None], draft_probs[None], uniform, noise)[0]


@dataclass
class DraftDistributionRow:
    """A sampled verification row whose drafts were drawn from ``draft_probs`` (a draft model's distribution)."""

    start: int  # its first sampling row (it owns k + 1 consecutive rows)
    draft_token_ids: list[int]
    draft_probs: torch.Tensor  # [k, V] on the logits' device
    generator: torch.Generator | None


def draft_verifier(rows: list[DraftDistributionRow], sampling_rows: list[SamplingRow]):
    """The sampler's ``verify`` hook: replaces the ordinary draws of these rows by rejection sampling against the
    target's processed distribution (temperature, top-k/top-p/min-p after penalties, as the sampler applies)."""

    def verify(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        groups: dict[int, list[DraftDistributionRow]] = {}  # rows of equal k go through one batched call
        for row in rows:
            groups.setdefault(len(row.draft_token_ids), []).append(row)
        device = logits.device
        for k, group in groups.items():
            index = torch.tensor([[r.start + i for i in range(k + 1)] for r in group], device=device)
            flat = index.view(-1)
            flat_rows = [sampling_rows[i] for i in flat.tolist()]
            probs = filtered_logits(logits.index_select(0, flat).float(), flat_rows).softmax(dim=-1)
            probs = probs.view(len(group), k + 1, -1)
            drafts = torch.tensor([r.draft_token_ids for r in group], dtype=torch.long, device=device)
            generators = [r.generator for r in group]
            uniform = exponential_noise((len(group), k), generators, device).neg_().exp_()  # exp(-E) ~ U(0, 1)
            noise = exponential_noise((len(group), (k + 1) * probs.shape[2]), generators, device)
            out = rejection_sample_batch(probs, drafts, torch.stack([r.draft_probs for r in group]), uniform,
                                         noise.view_as(probs))
            token_ids[flat] = out.view(-1)
        return token_ids

    return verify
