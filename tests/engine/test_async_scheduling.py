"""Async scheduling (step N+1 queued before step N's ids are read) gives exactly the synchronous results.

Forced on here on CPU, where the same code paths run (placeholders, surplus rows, late stops); on CUDA it
is the default. Each case runs one engine per mode on the same prompts and compares everything returned.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPTS = [
    "Paris is the capital of France. Continuous batching keeps the GPU busy",
    "The quick brown fox",
    "def add(a, b):\n    return a + b\n",
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

CASES = {
    "seeded_sampling": SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=9, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                                presence_penalty=0.4, max_tokens=9),
    "min_tokens_and_stop_ids": SamplingParams(temperature=0.8, seed=1, min_tokens=3, max_tokens=10,
                                              stop_token_ids=[5, 6, 7, 8, 9, 10, 11, 12]),
    "stop_strings": SamplingParams(temperature=0.0, max_tokens=12, stop=["e", " t"]),
    "n_and_logprobs": SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, logprobs=2),
}


def _run(model_dir, device: str, async_scheduling: bool, params: SamplingParams):
    llm = LLM(str(model_dir), device=device, dtype="float32", block_size=4, async_scheduling=async_scheduling)
    assert llm.engine.async_scheduling is async_scheduling
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [
        [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
          None if c.logprobs is None else [{k: round(v.logprob, 4) for k, v in lp.items()} for lp in c.logprobs])
         for c in out.outputs]
        for out in outputs
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_async_matches_sync(tiny_llama_dir, device, case):
    params = CASES[case]
    sync = _run(tiny_llama_dir, device, False, params)
    overlapped = _run(tiny_llama_dir, device, True, params)
    assert overlapped == sync
    assert any(choice[0] for result in sync for choice in result)  # something was generated


def test_abort_while_a_step_is_in_flight(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=4, async_scheduling=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", tokenizer.encode(prompt), params)
    engine.step()
    engine.step()
    assert engine.in_flight is not None
    engine.abort_request("r1")
    finished = {}
    while engine.has_unfinished_requests() or engine.in_flight is not None:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["r0", "r2"]
    assert all(len(out.outputs[0].token_ids) == 8 for out in finished.values())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
