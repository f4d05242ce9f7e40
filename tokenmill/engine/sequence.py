"""Request state: a ``Request`` (what the user asked) owns one ``Sequence`` per completion (n > 1 → n).

The scheduler and block manager work on sequences; the engine turns a request's sequences into one
RequestOutput. A sequence's progress is ``num_computed_tokens`` (tokens whose KV is in the cache).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from tokenmill.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        # On the plain ``_value_`` attribute: comparing Enum members costs ~1.5 us here (Python 3.11), and the
        # step loop asks this several times per sequence per step.
        return self._value_ in _FINISHED_VALUES


_FINISHED_VALUES = frozenset({"stop", "length", "abort"})


@dataclass(eq=False)
class Sequence:
    seq_id: str
    index: int  # completion index within its request
    request: Request
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None  # the runner seeds this sequence's generator with it (None: the shared default RNG)
    detokenizer: Any  # IncrementalDetokenizer
    # Sequences 1..n-1 of a request wait for sequence 0's prompt and then share its prompt blocks.
    leader: Sequence | None = None
    # Prompt + accepted generated ids, all known on the host (filled in __post_init__). Never holds a draft or a
    # stand-in for a token still on the device: those are counted by num_in_flight.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (or shared from the leader)
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    # Hash of each full block of this sequence that is registered in the prefix cache (chained).
    block_hashes: list[int] = field(default_factory=list)
    num_detokenized: int = 0  # generated tokens already fed to the detokenizer
    # Overlapped steps: tokens sampled on the device whose ids the host has not read yet (0 or 1). They follow
    # token_ids and count as tokens for scheduling; the runner reads them from its device-side buffer.
    num_in_flight: int = 0
    # What the runner has been told (see engine/step_record.py): ids of token_ids[:num_sent_tokens], the first
    # num_sent_blocks entries of block_table, and whether it holds state for this sequence at all.
    num_sent_tokens: int = 0
    num_sent_blocks: int = 0
    known_to_runner: bool = False
    # Most tokens (prompt + generated) it may reach: min(prompt + max_tokens, max_model_len). The engine sets
    # it on every sequence it creates; None only for sequences built by hand (scheduler tests).
    token_limit: int | None = None
    grammar: Any = None  # structured.RequestGrammar when the output is constrained (advanced as tokens land)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens it has, counting one still in flight."""
        return len(self.token_ids) + self.num_in_flight

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated ids known on the host."""
        return self.token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, counting one still in flight (min_tokens and the token limit count it)."""
        return self.num_tokens - self.prompt_len

    @property
    def reached_limit(self) -> bool:
        """All tokens it may produce exist (maybe still in flight): nothing more to compute for it."""
        return self.token_limit is not None and self.num_tokens >= self.token_limit

    @property
    def is_prefilled(self) -> bool:
        return self.num_computed_tokens >= self.prompt_len

    def detokenize_pending(self) -> str | None:
        """Feed generated tokens the detokenizer has not seen; returns a matched stop string, if any."""
        pending = self.token_ids[self.prompt_len + self.num_detokenized :]
        self.num_detokenized += len(pending)
        if not pending or self.detokenizer is None:
            return None
        return self.detokenizer.update(pending)

    def completion_output(self) -> CompletionOutput:
        self.detokenize_pending()
        finished = self.status.finished
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.output_text(finished) if self.detokenizer is not None else "",
            token_ids=list(self.output_token_ids),
            finish_reason=self.status.value if finished else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    sequences: list[Sequence] = field(default_factory=list)
    metrics: RequestMetrics | None = None

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def finished(self) -> bool:
        return all(seq.status.finished for seq in self.sequences)

    def make_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.completion_output() for seq in self.sequences],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=max((seq.num_cached_tokens for seq in self.sequences), default=0),
        )
