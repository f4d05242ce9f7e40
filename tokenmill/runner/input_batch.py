"""The runner's persistent batch: per-request state kept across steps and updated from each step record.

Every rank keeps one and applies the same records, so all ranks build the same inputs (the scheduler's record is
incremental: a decode step sends one new id per request, never the history). The sampling rank also keeps each
request's generator and sampling row here, so a step builds no per-request object for plain decode rows.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from tokenmill.engine.step_record import NewRequest, StepRecord
from tokenmill.sampling.penalties import needs_penalties
from tokenmill.sampling.sampler import SamplingRow, make_generator


@dataclass(slots=True)
class RequestState:
    req_id: str
    prompt_len: int
    token_ids: array  # array('q'): prompt + accepted outputs, as sent by the scheduler
    block_table: list[int]
    row: SamplingRow  # reused every step; its history is ``outputs`` when penalties read it
    needs_history: bool = False
    outputs: array = field(default_factory=lambda: array("q"))  # accepted outputs (penalty rows only)


class InputBatch:
    def __init__(self, device: torch.device, samples: bool = True) -> None:
        """``samples``: this rank samples (rank 0), so it keeps generators; other ranks only run the model."""
        self.device = device
        self.samples = samples
        self.requests: dict[str, RequestState] = {}
        # Where each plain sampling row of the last built step put its token in that step's sampled ids: the next
        # step reads an in-flight token from there (see kernels/stage_inputs.py InFlightIds).
        self.prev_sample_index: dict[str, int] = {}

    def _add(self, new: NewRequest) -> None:
        generator = make_generator(new.seed, self.device) if self.samples else None
        penalties = needs_penalties(new.params)
        outputs = array("q")
        state = RequestState(new.req_id, new.prompt_len, array("q"), [], SamplingRow(
            new.params, array("q"), outputs if penalties else (), generator, 0), penalties, outputs)
        self.requests[new.req_id] = state

    def update(self, record: StepRecord) -> None:
        """Apply the record's changes: O(requests in the record), O(1) per plain decode row."""
        for req_id in record.finished_req_ids:
            self.requests.pop(req_id, None)  # may never have reached the runner (aborted while waiting)
        for new in record.new_requests:
            self._add(new)
        for entry in record.scheduled:
            state = self.requests[entry.req_id]
            if entry.new_token_ids:
                before = len(state.token_ids)
                state.token_ids.extend(entry.new_token_ids)
                if before < state.prompt_len <= len(state.token_ids):  # the prompt is complete: sampling reads it
                    state.row.prompt_token_ids = state.token_ids[: state.prompt_len]
                if state.needs_history:
                    state.outputs.extend(state.token_ids[max(before, state.prompt_len):])
            table = state.block_table
            keep = entry.num_blocks - len(entry.new_block_ids)
            if len(table) != keep:
                del table[keep:]  # a rollback or a preemption freed the tail
            table.extend(entry.new_block_ids)
