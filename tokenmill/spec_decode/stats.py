"""Acceptance counters with vLLM's metric meanings (``spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens``, ``..._num_accepted_tokens_per_pos``), cumulative over the engine's life."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    num_drafts: int = 0  # verification rows that landed
    num_draft_tokens: int = 0  # draft tokens they carried
    num_accepted_tokens: int = 0  # draft tokens the target agreed with
    accepted_per_pos: list[int] = field(default_factory=list)  # [i]: drafts accepted at position i

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One verification row landed: ``num_drafts`` proposed, the first ``num_accepted`` of them kept."""
        self.num_drafts += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_drafts:
            self.accepted_per_pos.extend([0] * (num_drafts - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verification row yields on average: the accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def copy(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.accepted_per_pos))

    def since(self, earlier: SpecDecodeStats) -> SpecDecodeStats:
        """The counts accumulated after ``earlier`` (a benchmark's timed window)."""
        per_pos = [n - (earlier.accepted_per_pos[i] if i < len(earlier.accepted_per_pos) else 0)
                   for i, n in enumerate(self.accepted_per_pos)]
        return SpecDecodeStats(self.num_drafts - earlier.num_drafts, self.num_draft_tokens - earlier.num_draft_tokens,
                               self.num_accepted_tokens - earlier.num_accepted_tokens, per_pos)

    def summary(self) -> dict[str, float | int | list[int]]:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_acceptance_length": round(self.mean_acceptance_length, 4)}
