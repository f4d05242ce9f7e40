"""long_prefill_token_threshold (vLLM's name): the most prompt tokens one request computes per step, so a long prompt
arriving while others decode is spread over steps and leaves the step budget to other prompts; greedy output is
unchanged by the chunking."""

from __future__ import annotations

import pytest
from engine_helpers import make_seq

from tokenmill.config import EngineConfig, SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams


def _scheduler(budget: int, threshold: int) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, long_prefill_token_threshold=threshold)
    return Scheduler(config, BlockManager(256, 4, enable_prefix_caching=False))


def _advance(out) -> None:
    for item in out.scheduled:
        samples = item.samples  # before the computed count moves on
        item.seq.num_computed_tokens += item.num_tokens
        if samples:
            item.seq.token_ids.append(7)


def test_long_prompt_is_capped_per_step_and_leaves_budget_to_others():
    sched = _scheduler(budget=64, threshold=20)
    decoding = make_seq("decoding", [1, 2, 3], max_tokens=50)
    sched.add(decoding)
    _advance(sched.schedule())  # its prompt fits under the cap: one step
    long, short = make_seq("long", list(range(50))), make_seq("short", list(range(100, 110)))
    sched.add(long)
    sched.add(short)
    seen = []
    for _ in range(3):
        out = sched.schedule()
        seen.append([(item.seq.seq_id, item.num_tokens) for item in out.scheduled])
        _advance(out)
    assert seen == [
        [("decoding", 1), ("long", 20), ("short", 10)],  # without the cap "long" would take 50 of the budget
        [("decoding", 1), ("short", 1), ("long", 20)],
        [("decoding", 1), ("short", 1), ("long", 10)],
    ]


def test_threshold_is_validated():
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be >= 0"):
        SchedulerConfig(long_prefill_token_threshold=-1)
    with pytest.raises(ValueError, match="needs enable_chunked_prefill"):
        SchedulerConfig(long_prefill_token_threshold=16, enable_chunked_prefill=False)


def test_greedy_output_is_unchanged_by_the_cap(tiny_llama_dir):
    def run(threshold: int) -> list[list[int]]:
        engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", max_model_len=128,
                                                    long_prefill_token_threshold=threshold), stream_outputs=False)
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        for i, length in enumerate((40, 7, 23)):
            engine.add_request(f"r{i}", [(5 + 3 * i + j) % 200 + 3 for j in range(length)], params)
        finals = {}
        while engine.has_unfinished_requests():
            for output in engine.step():
                finals[output.request_id] = output.outputs[0].token_ids
        return [finals[f"r{i}"] for i in range(3)]

    assert run(threshold=6) == run(threshold=0)


def test_profile_run_fills_the_token_budget_with_prompts_no_longer_than_max_model_len():
    """The KV cache is sized after a forward at the largest step: max_num_batched_tokens tokens, which a short
    max_model_len splits into several prompts (one prompt of max_model_len tokens under-counts activations)."""
    engine = LLMEngine.from_kwargs(random_weights="tiny-llama", device="cpu", dtype="float32", max_model_len=48,
                                   max_num_batched_tokens=100, kv_cache_memory=0.01)
    runner, seen = engine.runner, []
    build = runner.attn_backend.build_metadata

    def record(query_lens, seq_lens, tables, block_size, device):
        seen.append((list(query_lens), [len(t) for t in tables]))
        return build(query_lens, seq_lens, tables, block_size, device)

    runner.attn_backend.build_metadata = record
    runner.profile_run(100, 4, max_seq_len=48)
    assert seen == [([48, 48, 4], [3, 3, 1])]  # block size 16
