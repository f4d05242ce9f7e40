"""The step record: what the scheduler decided for one step, as plain data keyed by request id.

Produced by ``Scheduler.schedule()`` (``SchedulerOutput.record``), consumed by the model runner, which keeps its own
per-request state (``runner/input_batch.py``) and updates it from the record; tensor-parallel ranks receive the
same record over their pipe. It holds no live ``Sequence`` and no tensor, so it pickles small.
Each field is incremental: the runner is told only what changed since it last saw the request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequest:
    """A request the runner has not seen: the state it keeps until the request is in ``finished_req_ids``."""

    req_id: str
    params: SamplingParams
    seed: int | None  # the runner makes the request's generator from it (sampling ranks only)
    prompt_len: int


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of the step. Its query covers positions ``num_computed_tokens ..
    num_computed_tokens + num_tokens - 1``: known tokens, then at most one token still in flight (sampled by the
    previous step, read on the device), then ``draft_token_ids`` (a verification row)."""

    req_id: str
    num_tokens: int  # query tokens this step, drafts included
    num_computed_tokens: int  # tokens whose KV is cached before this step (a rollback can lower it)
    new_token_ids: list[int]  # accepted ids the runner has not been sent (the whole prompt on first schedule)
    new_block_ids: list[int]  # appended to the runner's block table after truncating it to num_blocks - len(new)
    num_blocks: int  # block-table length after this step (a rollback that freed blocks shrinks it)
    draft_token_ids: list[int] = field(default_factory=list)
    samples: bool = False  # the query reaches the last known token: its logits give the next token(s)


@dataclass(slots=True)
class StepRecord:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # batch order (one-token rows first)
    new_requests: list[NewRequest] = field(default_factory=list)  # apply before ``scheduled``
    finished_req_ids: list[str] = field(default_factory=list)  # drop their runner state before the rest

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.scheduled)
