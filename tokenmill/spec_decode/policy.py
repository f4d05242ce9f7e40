"""Adaptive speculation: which rows of a step get draft tokens and how many (k), so that speculation never costs
throughput.

A verification row of 1 + k query tokens yields E(a, k) = 1 + a + ... + a^k tokens on average when each draft is
accepted with probability a, estimated per sequence from its recent verifications (decayed counts over a prior).
A step's time comes from a ``StepCost`` (step_cost.py): measured from the engine's own steps, with a ridge prior
t(n) = max(1, n / saturation_tokens) until measured. For a step with b decoding rows the policy picks k and the m
rows with the highest acceptance that maximise expected tokens per second, (b + sum of E - 1 over the m rows) /
t(b + m k), and speculates only when that beats plain decoding, b / t(b), by ``min_gain``; with ``uniform`` (CUDA
graphs pad every row to one query length) it is all rows or none. A draft model's k forward passes are added to the
cost (``draft_cost`` of a target step each).

The acceptance estimate forgets fast (``decay`` 0.8 per verification, a prior of 0.6 worth one observation): where
a 5-token step costs ~1.4-1.8 one-token steps (SmolLM2 on this project's 2-core CPU box) a row whose drafts fail
stops after two to four verifications. Two things keep the estimates honest. Exploration: while the plain step's
size is not measured and the policy would speculate, every ``probe_interval``-th plan decodes plainly, so the
baseline it compares against is measured, not assumed. Retry: a row that sits out forgets its history at
``rest_decay`` (0.99) per step, drifting back to the prior, so a row whose text turns repetitive is tried again
(tens of steps later); a failed retry costs one short verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

from tokenmill.spec_decode.step_cost import StepCost


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verification row yields on average: the accepted prefix of k drafts plus the target's token."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass
class AcceptanceEstimate:
    """A per-sequence acceptance probability: decayed counts of accepted drafts and of rejections over a prior."""

    accepted: float = 0.0
    rejected: float = 0.0

    def update(self, num_drafts: int, num_accepted: int, decay: float) -> None:
        self.accepted = decay * self.accepted + num_accepted
        self.rejected = decay * self.rejected + (1 if num_accepted < num_drafts else 0)

    def rest(self, decay: float) -> None:
        """A step without drafts: the evidence fades (the estimate drifts back to the prior)."""
        self.accepted *= decay
        self.rejected *= decay

    def value(self, prior: float, prior_weight: float) -> float:
        return (self.accepted + prior * prior_weight) / (self.accepted + self.rejected + prior_weight)


@dataclass(frozen=True)
class DraftPlan:
    """A step's speculation: ``k`` drafts for each row in ``seq_ids`` (empty: decode plainly)."""

    k: int = 0
    seq_ids: tuple[str, ...] = field(default_factory=tuple)


NO_DRAFTS = DraftPlan()


class AdaptivePolicy:
    def __init__(self, max_k: int, step_cost: StepCost, adaptive: bool = True,
                 disable_by_batch_size: int | None = None, prior: float = 0.6, prior_weight: float = 1.0,
                 decay: float = 0.8, rest_decay: float = 0.99, min_gain: float = 1.05, draft_cost: float = 0.0,
                 probe_interval: int = 8) -> None:
        """``draft_cost``: one proposal step's time relative to one target step of the same shape (a draft
        model's parameter count over the target's; 0 for n-gram lookups)."""
        self.max_k = max_k
        self.step_cost = step_cost
        self.draft_cost = draft_cost
        self.adaptive = adaptive
        self.disable_by_batch_size = disable_by_batch_size
        self.prior, self.prior_weight, self.decay, self.rest_decay = prior, prior_weight, decay, rest_decay
        self.min_gain, self.probe_interval = min_gain, probe_interval
        self.estimates: dict[str, AcceptanceEstimate] = {}
        self.num_plans = 0

    def acceptance(self, seq_id: str) -> float:
        estimate = self.estimates.get(seq_id)
        return self.prior if estimate is None else estimate.value(self.prior, self.prior_weight)

    def plan(self, seq_ids: list[str], num_other_tokens: int = 0, uniform: bool = False) -> DraftPlan:
        """Drafts for a step whose decoding rows are ``seq_ids`` (plus ``num_other_tokens`` of prompt chunks)."""
        batch = len(seq_ids)
        if not batch or (self.disable_by_batch_size is not None and batch > self.disable_by_batch_size):
            return NO_DRAFTS
        if not self.adaptive:
            return DraftPlan(self.max_k, tuple(seq_ids))
        self.num_plans += 1
        ranked = sorted(((self.acceptance(s), s) for s in seq_ids), reverse=True)
        k, m = self._best(batch, [a for a, _ in ranked], num_other_tokens, uniform)
        if k and not self.step_cost.known(batch + num_other_tokens) and self.num_plans % self.probe_interval == 0:
            k = m = 0  # measure the plain step this policy compares against
        chosen = tuple(s for _, s in ranked[:m])
        resting = seq_ids if not k else [s for _, s in ranked[m:]]
        for seq_id in resting:
            estimate = self.estimates.get(seq_id)
            if estimate is not None:
                estimate.rest(self.rest_decay)
        return DraftPlan(k, chosen) if k else NO_DRAFTS

    def _best(self, batch: int, rates: list[float] | None, num_other_tokens: int, uniform: bool,
              cost: StepCost | None = None) -> tuple[int, int]:
        """(k, m): drafts per row and how many of the best rows (``rates``: descending; None: all accept) get them;
        (0, 0) when plain decoding pays best. Row counts m beyond 16 are tried on a grid of batch / 16 steps, so a
        large batch costs a few hundred cost look-ups, not k x batch. ``cost``: default the measured step cost."""
        cost = cost or self.step_cost
        counts = [batch] if uniform else _row_counts(batch)
        best_k, best_m = 0, 0
        best = batch / cost(batch + num_other_tokens) * self.min_gain
        # E(a, k) - 1 = a + ... + a^k: each k adds a^k per row to the expected accepted drafts of the m best rows.
        extras = [0.0] * len(counts)
        powers = rates
        for k in range(1, self.max_k + 1):
            if powers is None:
                extras = [float(k * m) for m in counts]
            else:
                if uniform:
                    extras[0] += sum(powers)
                else:
                    cumulative = list(accumulate(powers))
                    extras = [e + cumulative[m - 1] for e, m in zip(extras, counts, strict=True)]
                powers = [p * a for p, a in zip(powers, rates, strict=True)]
            for m, extra in zip(counts, extras, strict=True):
                time = cost(batch + m * k + num_other_tokens)
                if self.draft_cost:
                    time += k * self.draft_cost * cost(m)
                gain = (batch + extra) / time
                if gain > best:
                    best_k, best_m, best = k, m, gain
        return best_k, best_m

    def may_speculate(self, batch: int) -> bool:
        """Whether any k could pay off at this batch size even if every draft were accepted; asked by an engine
        that overlaps its steps, which must give that up to speculate (proposals need each step's ids).

        Answered with the step-cost prior (the roofline ridge), not the measured costs: those come from launch to
        landing and cannot see what overlap saves. On an H100 (Llama-3-8B shape, batch 256) the measured costs made
        verification look worth trying, the engine gave up overlap, and ran at 0.77x plain decoding on rejected
        drafts; with the prior here (the previous policy) the same run measured 0.992x. Below the ridge the gate
        (mode_gate.py) then compares both modes' measured throughput."""
        if not batch or (self.disable_by_batch_size is not None and batch > self.disable_by_batch_size):
            return False
        if not self.adaptive:
            return True
        return self._best(batch, None, 0, uniform=True, cost=getattr(self.step_cost, "prior", self.step_cost))[0] > 0

    def observe(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        estimate = self.estimates.setdefault(seq_id, AcceptanceEstimate())
        estimate.update(num_drafts, num_accepted, self.decay)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A target step of ``num_tokens`` query tokens took ``seconds`` (launch to landing)."""
        self.step_cost.record(num_tokens, seconds)

    def release(self, seq_id: str) -> None:
        self.estimates.pop(seq_id, None)


def _row_counts(batch: int) -> list[int]:
    """How many rows may speculate: every count up to 16, then multiples of batch / 16 (increasing, ending at batch)."""
    return sorted({*range(1, min(batch, 16) + 1), *(batch * j // 16 for j in range(1, 17))} - {0})
