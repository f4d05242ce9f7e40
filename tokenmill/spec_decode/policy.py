"""Adaptive speculation: how many draft tokens (k) a step verifies, so that speculation never costs throughput.

A verification row of 1 + k query tokens yields E(a, k) = 1 + a + ... + a^k tokens on average when each draft is
accepted with probability a (estimated per sequence from its recent verifications). A step's time is flat while
its query tokens fit what the hardware does in one weight read, then grows in proportion:
t(n) ~ max(1, n / saturation_tokens) for n query tokens. The policy picks the k that maximises tokens per unit of
time for the step's decoding rows and speculates only when that beats plain decoding by ``min_gain``: at batch 1 it
speculates (verification is almost free), at a batch that already saturates the device it turns itself off. A
draft model's own k forward passes are added to the cost (``draft_cost`` each, relative to a target step).
"""

from __future__ import annotations

from dataclasses import dataclass

# Query tokens at which a decode step stops being bound by reading the weights (rough ridge points: an 8B bf16
# model on an H100 stays flat to ~128 rows, benchmarks/gpu_spec_decode.py measures it; a 135M model on a few CPU
# cores is already compute-bound at a handful of tokens, benchmarks/spec_decode_cpu.py).
SATURATION_TOKENS = {"cuda": 128, "cpu": 8}


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verification row yields on average: the accepted prefix of k drafts plus the target's token."""
    return sum(acceptance**i for i in range(k + 1))


@dataclass
class AcceptanceEstimate:
    """A per-sequence acceptance probability: decayed counts of accepted and rejected drafts over a prior."""

    accepted: float = 0.0
    rejected: float = 0.0

    def update(self, num_drafts: int, num_accepted: int, decay: float) -> None:
        self.accepted = decay * self.accepted + num_accepted
        self.rejected = decay * self.rejected + (1 if num_accepted < num_drafts else 0)

    def value(self, prior: float, prior_weight: float) -> float:
        return (self.accepted + prior * prior_weight) / (self.accepted + self.rejected + prior_weight)


class AdaptivePolicy:
    def __init__(self, max_k: int, saturation_tokens: float, adaptive: bool = True,
                 disable_by_batch_size: int | None = None, prior: float = 0.6, prior_weight: float = 2.0,
                 decay: float = 0.9, min_gain: float = 1.05, draft_cost: float = 0.0) -> None:
        """``draft_cost``: one proposal step's time relative to one target step of the same shape (a draft
        model's parameter count over the target's; 0 for n-gram lookups)."""
        self.max_k = max_k
        self.draft_cost = draft_cost
        self.saturation_tokens = saturation_tokens
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.prior, self.prior_weight, self.decay, self.min_gain = prior, prior_weight, decay, min_gain
        self.estimates: dict[str, AcceptanceEstimate] = {}

    def acceptance(self, seq_id: str) -> float:
        estimate = self.estimates.get(seq_id)
        return self.prior if estimate is None else estimate.value(self.prior, self.prior_weight)

    def step_cost(self, num_tokens: int) -> float:
        return max(1.0, num_tokens / self.saturation_tokens)

    def choose_k(self, seq_ids: list[str], num_other_tokens: int = 0, _all_accepted: bool = False) -> int:
        """Drafts per row for a step whose decoding rows are ``seq_ids`` (plus ``num_other_tokens`` of prompt
        chunks): the k in 0..max_k with the most expected tokens per unit of step time."""
        batch = len(seq_ids)
        if not batch or (self.disable_by_batch_size is not None and batch > self.disable_by_batch_size):
            return 0
        if not self.adaptive:
            return self.max_k
        rates = [1.0] * batch if _all_accepted else [self.acceptance(s) for s in seq_ids]
        plain = batch / self.step_cost(batch + num_other_tokens)
        best_k, best = 0, plain * self.min_gain
        for k in range(1, self.max_k + 1):
            cost = self.step_cost(batch * (k + 1) + num_other_tokens) + k * self.draft_cost * self.step_cost(batch)
            gain = sum(expected_tokens(a, k) for a in rates) / cost
            if gain > best:
                best_k, best = k, gain
        return best_k

    def may_speculate(self, batch: int) -> bool:
        """Whether any k could pay off at this batch size even if every draft were accepted (when not, the engine
        keeps overlapping steps instead of waiting for ids a proposal would need)."""
        if not self.adaptive:
            return not (self.disable_by_batch_size is not None and batch > self.disable_by_batch_size)
        return self.choose_k([""] * batch, _all_accepted=True) > 0 if batch else False

    def observe(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        estimate = self.estimates.setdefault(seq_id, AcceptanceEstimate())
        estimate.update(num_drafts, num_accepted, self.decay)

    def release(self, seq_id: str) -> None:
        self.estimates.pop(seq_id, None)
