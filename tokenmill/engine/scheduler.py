"""Scheduler: decides which sequences run this step and how many tokens each (no tensors here).

There are no prefill/decode phases: a sequence gets N tokens per step, N = the rest of its prompt (or a
chunk of it that fits the token budget) or 1 when decoding, so chunked prefill and mixed batches fall out.
Running sequences go first; when blocks run out the newest running sequence is preempted by recompute
(blocks freed, back to the head of the waiting queue). Waiting sequences are admitted in FCFS order.
A decoding sequence may carry draft tokens from a ``DraftProposer``: it is then a verification row of 1 + k
query tokens. The plain record of the step (engine/step_record.py) is what the runner receives.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.engine.step_record import NewRequest, ScheduledRequest, StepRecord
from tokenmill.spec_decode.decoder import DraftRequest


class DraftProposer(Protocol):
    """Proposes tokens to verify after a decoding sequence's last token (speculative decoding, issue 23).

    ``token_ids`` are the sequence's accepted ids (prompt + output; read-only); at most ``max_num_tokens`` ids
    are used. Return [] to decode plainly this step. A proposer may also offer ``propose_batch(requests)`` (one
    call per step for every decoding sequence, ``spec_decode.decoder.DraftRequest``s → {seq id: drafts}) and
    ``release(seq_id)`` (the sequence finished); ``spec_decode.SpeculativeDecoder`` does.
    """

    def propose(self, seq_id: str, token_ids: list[int], max_num_tokens: int) -> list[int]: ...


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (drafts included)
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last known token, so its logits give the next one."""
        return self.seq.num_computed_tokens + self.num_tokens - len(self.draft_token_ids) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    record: StepRecord = field(default_factory=StepRecord)  # the same step as plain data, for the runner

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if config.max_num_batched_tokens is None:
            raise ValueError("max_num_batched_tokens is unresolved; build the config through EngineConfig")
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.draft_proposer: DraftProposer | None = None
        self.finished_seq_ids: list[str] = []  # runner state to drop, sent with the next record
        self.kv_reservation = config.kv_reservation
        self.max_model_len: int | None = None  # set by the engine; what "max-model-len" reservations reserve

    @property
    def _prefill_cap(self) -> int:
        """Most tokens one sequence computes in a step (long_prefill_token_threshold; 0 means no cap)."""
        return self.config.long_prefill_token_threshold or self.config.max_num_batched_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_prompt_work(self) -> bool:
        """Whether the next step may carry prompt tokens: a request waits, or a running one is mid-prefill."""
        return bool(self.waiting) or any(not seq.is_prefilled for seq in self.running)

    def remove_finished(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence from the queues and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        release = getattr(self.draft_proposer, "release", None)
        if release is not None:
            release(seq.seq_id)
        if seq.known_to_runner:
            seq.known_to_runner = False
            self.finished_seq_ids.append(seq.seq_id)

    def rollback(self, seq: Sequence, num_rejected: int) -> None:
        """Forget the KV of the last ``num_rejected`` computed tokens (draft tokens a verification rejected):
        they are recomputed if ever needed, and blocks holding nothing else go back to the free queue."""
        if num_rejected <= 0:
            return
        seq.num_computed_tokens -= num_rejected
        self.block_manager.free_tail(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. Running sequences, oldest first; make room by preempting the newest.
        proposals = self._propose_drafts(budget)
        scheduled = out.scheduled
        block_size = self.block_manager.block_size
        multi_token = False  # an entry of several tokens: the one-token entries must be moved before it
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            # Inlined Sequence.num_tokens / reached_limit: this loop runs for every running sequence every step.
            num_tokens = len(seq.token_ids) + seq.num_in_flight
            if seq.token_limit is not None and num_tokens >= seq.token_limit:
                index += 1  # its last token is in flight; the engine finishes it when it lands
                continue
            computed = seq.num_computed_tokens
            if (num_tokens - computed == 1 and computed < len(seq.block_table) * block_size
                    and (not proposals or seq.seq_id not in proposals)):
                # A plain decode whose token fits the blocks it holds (the common row): nothing to allocate.
                scheduled.append(ScheduledSequence(seq, 1))
                budget -= 1
                index += 1
                continue
            num_new = min(num_tokens - computed, budget, self._prefill_cap)
            drafts = proposals.get(seq.seq_id, [])[: budget - 1] if num_new == 1 else []
            num_new += len(drafts)
            while not self.block_manager.can_allocate(seq, num_new):
                if drafts:  # speculation is optional: drop it before preempting anyone
                    drafts, num_new = [], 1
                    continue
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, num_new)
                scheduled.append(ScheduledSequence(seq, num_new, drafts))
                multi_token |= num_new != 1
                budget -= num_new
                index += 1
                continue
            break  # seq itself was preempted: nothing older is left to run

        # 2. Waiting sequences in arrival order, unless this step had to preempt (memory is tight).
        if out.preempted:
            out.record = self._record(out)
            return out
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            leader = seq.leader
            if leader is not None and not leader.status.finished and not leader.is_prefilled:
                skipped.append(self.waiting.popleft())  # shares the leader's prompt once it is computed
                continue
            if leader is not None and leader.block_table:
                self.block_manager.share_prompt_blocks(seq, leader)
            self.block_manager.match_prefix(seq)
            num_new = seq.num_tokens - seq.num_computed_tokens
            if not self.config.enable_chunked_prefill and num_new > budget:
                self._release_unscheduled(seq)
                break
            num_new = min(num_new, budget, self._prefill_cap)
            if not self.block_manager.can_allocate(seq, num_new) or not self._reservation_fits(seq):
                self._release_unscheduled(seq)
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            multi_token |= num_new != 1
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        # One-token entries first: the attention backend sends a leading run of them to the decode kernel,
        # and one stuck behind a prompt chunk would go through the prefill kernel's 128-row query tiles.
        if multi_token:
            scheduled.sort(key=lambda item: item.num_tokens != 1)
        out.record = self._record(out)
        return out

    def _reserved_blocks(self, seq: Sequence) -> int:
        """Blocks a sequence may still take under the reservation mode (0 for paged)."""
        if self.kv_reservation == "none":
            return 0
        if self.kv_reservation == "max-model-len" and self.max_model_len is not None:
            tokens = self.max_model_len
        else:
            tokens = seq.token_limit or seq.num_tokens
        return max(0, self.block_manager.blocks_needed(tokens) - len(seq.block_table))

    def _reservation_fits(self, seq: Sequence) -> bool:
        """Whole-request reservation: admit only if the free blocks cover what every running sequence and this one
        may still take, so nobody ever waits for memory mid-request (a contiguous allocator's guarantee)."""
        if self.kv_reservation == "none" or not self.running:  # alone, it gets what paging would give it
            return True
        outstanding = sum(self._reserved_blocks(s) for s in self.running)
        return self.block_manager.num_free_blocks >= outstanding + self._reserved_blocks(seq)

    def _propose_drafts(self, budget: int) -> dict[str, list[int]]:
        """Draft tokens for the decoding sequences, asked of the proposer once per step (a draft model batches
        them); none while a token is in flight (a proposal needs the ids)."""
        proposer = self.draft_proposer
        if proposer is None:
            return {}
        requests = []
        for seq in self.running:
            # Grammar-constrained rows decode plainly (a draft would need the matcher's masks per position).
            if seq.num_in_flight or seq.num_tokens - seq.num_computed_tokens != 1 or seq.grammar is not None:
                continue
            # k drafts can yield k + 1 tokens: stay within the sequence's token limit and the step's budget.
            room = min(budget - 1, (seq.token_limit or seq.num_tokens + budget) - seq.num_tokens - 1)
            if room > 0:
                requests.append(DraftRequest(seq.seq_id, seq.token_ids, room, seq.params, seq.seed))
        if not requests:
            return {}
        propose_batch = getattr(proposer, "propose_batch", None)
        if propose_batch is not None:
            proposals = propose_batch(requests)
        else:
            proposals = {r.seq_id: proposer.propose(r.seq_id, r.token_ids, r.max_num_tokens) for r in requests}
        return {r.seq_id: list(proposals[r.seq_id])[: r.max_num_tokens] for r in requests if proposals.get(r.seq_id)}

    def _record(self, out: SchedulerOutput) -> StepRecord:
        """The step as plain data: per sequence only what the runner has not been told yet."""
        if not out.scheduled:  # the engine runs no step: keep the finished ids for the next record
            return StepRecord()
        record = StepRecord(finished_req_ids=self.finished_seq_ids)
        self.finished_seq_ids = []
        new_requests, scheduled = record.new_requests, record.scheduled
        for item in out.scheduled:
            seq, drafts = item.seq, item.draft_token_ids
            if not seq.known_to_runner:
                seq.known_to_runner = True
                new_requests.append(NewRequest(seq.seq_id, seq.params, seq.seed, seq.prompt_len))
            table, token_ids, start = seq.block_table, seq.token_ids, seq.num_computed_tokens
            num_tokens = len(token_ids) + seq.num_in_flight
            # Positional arguments: this runs for every scheduled sequence on every step.
            scheduled.append(ScheduledRequest(
                seq.seq_id, item.num_tokens, start, token_ids[seq.num_sent_tokens:], table[seq.num_sent_blocks:],
                len(table), drafts, start + item.num_tokens - len(drafts) == num_tokens,
            ))
            seq.num_sent_tokens = len(token_ids)
            seq.num_sent_blocks = len(table)
        return record

    def _release_unscheduled(self, seq: Sequence) -> None:
        # Prefix blocks taken while trying to admit it go back; it retries next step.
        self.block_manager.free(seq)
        seq.num_cached_tokens = 0
