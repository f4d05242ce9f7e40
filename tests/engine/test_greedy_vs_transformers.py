"""Acceptance 1: greedy tokens identical to transformers for every architecture and engine mode.

Modes: prefix caching on, off, a token budget small enough to chunk every prompt, and a KV pool small
enough to force preemption by recompute; each also with async scheduling. All must give transformers' tokens.
"""

from __future__ import annotations

import pytest
from tiny_models import ARCHITECTURES, transformers_greedy
from transformers import AutoTokenizer

from tokenmill import LLM, SamplingParams

MAX_NEW = 12
TEXTS = [
    "The quick brown fox",
    "Paris is the capital of France. Continuous batching keeps the GPU busy; paged attention",
    "Unicode: café, naïve, Straße, 東京",
    "Paris is the capital of France. Continuous batching keeps the GPU busy; paged attention stores keys",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i * i)\n" * 2,
    "The quick brown fox",  # duplicate: a full prefix-cache hit
]
MODES = {
    "prefix_cache_on": dict(enable_prefix_caching=True),
    "prefix_cache_off": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=7, block_size=4),
    "preemption": dict(num_kv_blocks=28, block_size=4),
}
# Async scheduling (on by default on CUDA) forced on here: placeholders, surplus rows and late stops on CPU.
MODES.update({f"async_{name}": dict(kwargs, async_scheduling=True) for name, kwargs in list(MODES.items())})


def _reference(model_dir, prompts: list[list[int]]) -> list[list[int]]:
    return transformers_greedy(model_dir, prompts, MAX_NEW)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_case(request, tiny_model_dirs):
    model_dir = tiny_model_dirs[request.param]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.encode(t) for t in TEXTS]
    return model_dir, prompts, _reference(model_dir, prompts)


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_tokens_match_transformers(arch_case, mode):
    model_dir, prompts, expected = arch_case
    llm = LLM(str(model_dir), device="cpu", dtype="float32", **MODES[mode])
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == expected
    if "prefix_cache" in mode:  # a second pass finds the first pass's blocks when caching is on
        again = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
    stats = llm.engine.get_stats()
    if mode.endswith("prefix_cache_on"):
        assert stats.prefix_cache_hits > 0
    if mode.endswith("prefix_cache_off"):
        assert stats.prefix_cache_hits == 0
    if mode.endswith("preemption"):
        assert stats.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
