"""Scheduler: token budget, chunked prefill, mixed batches, FCFS, preemption by recompute, n>1 sharing."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_seq

from tokenmill.config import EngineConfig, SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.engine.sequence import SequenceStatus


def _scheduler(num_blocks=64, block_size=4, budget=64, max_seqs=8, chunked=True, caching=False) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    config = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(config, bm)


def _advance(sched: Scheduler, out: SchedulerOutput, token: int = 7) -> None:
    """What the engine does after a step: computed tokens move on, sampling sequences get a token."""
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_tokens
        if samples:
            item.seq.token_ids.append(token)
        sched.block_manager.cache_full_blocks(item.seq)


def test_prompt_is_chunked_under_the_token_budget_and_mixed_with_decodes():
    sched = _scheduler(budget=8)
    short, long = make_seq("short", [1, 2, 3]), make_seq("long", list(range(20)))
    sched.add(short)
    sched.add(long)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [("short", 3), ("long", 5)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    _advance(sched, out)
    out = sched.schedule()  # decode of short (1 token) + next chunk of long (7)
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [("short", 1), ("long", 7)]
    _advance(sched, out)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [("short", 1), ("long", 7)]
    _advance(sched, out)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [("short", 1), ("long", 1)]
    assert out.scheduled[1].samples


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = _scheduler(budget=8, chunked=False)
    a, b = make_seq("a", list(range(6))), make_seq("b", list(range(6)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["a"]  # b does not fit in the 2 tokens left


def test_max_num_seqs_caps_the_running_set_fcfs():
    sched = _scheduler(max_seqs=2)
    seqs = [make_seq(str(i), [1, 2]) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["0", "1"]
    assert [s.seq_id for s in sched.waiting] == ["2", "3"]


def test_preemption_frees_the_newest_and_requeues_it_first():
    # 4 blocks of 2 tokens. Two sequences of 3 tokens take 2 blocks each; decoding needs a third block.
    sched = _scheduler(num_blocks=4, block_size=2, budget=64)
    old, new = make_seq("old", [1, 2, 3]), make_seq("new", [4, 5, 6])
    sched.add(old)
    sched.add(new)
    _advance(sched, sched.schedule())  # both prefilled; each now has 4 tokens (a full 2nd block)
    out = sched.schedule()  # both decode position 3: still within their 2 blocks
    _advance(sched, out)
    out = sched.schedule()  # position 4 needs a third block each: only by preempting "new"
    assert [s.seq.seq_id for s in out.scheduled] == ["old"]
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    # Recompute: once room exists, "new" is prefilled again over prompt + generated tokens.
    sched.remove_finished(old)
    out = sched.schedule()
    assert [(s.seq.seq_id, s.num_tokens) for s in out.scheduled] == [("new", new.num_tokens)]


def test_children_wait_for_the_leader_prompt_then_share_its_blocks():
    sched = _scheduler(block_size=4)
    leader = make_seq("r#0", list(range(10)))
    child = make_seq("r#1", list(range(10)), leader=leader)
    sched.add(leader)
    sched.add(child)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["r#0"]
    _advance(sched, out)
    out = sched.schedule()
    entries = {s.seq.seq_id: s.num_tokens for s in out.scheduled}
    assert entries == {"r#0": 1, "r#1": 2}  # 8 prompt tokens shared, 2 computed
    assert child.block_table[:2] == leader.block_table[:2]


def test_abort_of_waiting_and_running_frees_everything():
    sched = _scheduler(num_blocks=8, block_size=4)
    a, b = make_seq("a", list(range(12))), make_seq("b", list(range(40)))
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq.seq_id for s in out.scheduled] == ["a"]  # b needs 10 blocks: stays waiting
    for seq in (a, b):
        seq.status = SequenceStatus.FINISHED_ABORTED
        sched.remove_finished(seq)
    assert sched.num_unfinished == 0
    assert sched.block_manager.num_free_blocks == 8


def test_token_budget_default_follows_the_device():
    assert EngineConfig.from_kwargs(device="cpu").scheduler.max_num_batched_tokens == 2048
    assert EngineConfig.from_kwargs(device="cpu", max_num_batched_tokens=64).scheduler.max_num_batched_tokens == 64
    if torch.cuda.is_available():
        assert EngineConfig.from_kwargs(device="cuda").scheduler.max_num_batched_tokens == 8192
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="unresolved"):
        Scheduler(SchedulerConfig(), BlockManager(4, 4, False))
