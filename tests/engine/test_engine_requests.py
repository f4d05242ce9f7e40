"""Engine behaviour through the public API: n>1, seeds, stop strings, logprobs, abort, no block leaks."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=4)


def _no_leak(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(block.ref_count == 0 for block in engine.block_manager.blocks)


def test_n_completions_are_distinct_and_share_prompt_blocks(tiny_llama_dir):
    # Prefix caching off: the only way a child can start with computed tokens is the fork from its leader.
    llm = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", block_size=4, enable_prefix_caching=False)
    prompt = "Paris is the capital of France. Continuous batching keeps the GPU busy"
    prompt_len = len(llm.get_tokenizer().encode(prompt))
    params = SamplingParams(n=4, temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in output.outputs}) == 4
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in output.outputs)
    children = llm.engine.get_stats()
    assert children.prefix_cache_hits == 0
    # Every full prompt block but the one holding the last prompt token is shared, not recomputed.
    assert output.num_cached_tokens == (prompt_len - 1) // 4 * 4 > 0
    _no_leak(llm.engine)


def test_seeded_sampling_reproduces_and_seeds_differ(llm):
    prompt = "Once upon a time"

    def run(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=seed, ignore_eos=True)
        return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_seeded_output_is_independent_of_batch_company(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=11, ignore_eos=True)
    alone = llm.generate(["The quick brown fox"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    noisy = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate(["café 東京", "The quick brown fox", "def add"], [noisy, seeded, noisy], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone


def test_stop_string_is_excluded_and_found_across_tokens(llm):
    base = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 6
    # Pick a stop string spanning the boundary between two generated tokens.
    tokenizer = llm.get_tokenizer()
    pieces = [tokenizer.decode(base.token_ids[:i]) for i in range(1, len(base.token_ids) + 1)]
    boundary = next(len(p) for p in pieces if len(p) >= 3 and len(p) < len(text) - 2)
    stop = text[boundary - 2 : boundary + 2]
    cut = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[: text.index(stop)]
    assert stop not in cut.text


def test_stop_token_ids_and_min_tokens(llm):
    base = llm.generate(["The quick"], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[2]
    first = base.token_ids.index(stop_id)
    out = llm.generate(["The quick"], SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_id],
                                                     ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == stop_id
    longer = llm.generate(["The quick"], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=first + 2,
                                                        stop_token_ids=[stop_id], ignore_eos=True), use_tqdm=False)
    assert len(longer[0].outputs[0].token_ids) >= first + 2


def test_logprobs_are_returned_per_token(llm):
    out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token_id in entry and entry[token_id].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        values = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert all(v <= 0 for v in values)


def test_abort_frees_blocks_midway(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    tokenizer = llm.get_tokenizer()
    for i in range(3):
        engine.add_request(f"abort-{i}", tokenizer.encode(f"some prompt text number {i}"), params)
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request(["abort-0", "abort-1", "abort-2"])
    _no_leak(engine)


def test_invalid_requests_raise_clear_errors(llm):
    engine = llm.engine
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", [5] * (engine.max_model_len + 1), SamplingParams())
    with pytest.raises(ValueError, match=r"max_tokens \(600\)"):
        engine.add_request("l2", [5] * 10, SamplingParams(max_tokens=600))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=2.5)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    _no_leak(engine)


def test_prompt_logprobs_is_refused_until_supported():
    with pytest.raises(ValueError, match="prompt_logprobs is not supported yet"):
        SamplingParams(prompt_logprobs=1)
    with pytest.raises(ValueError, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=99)


def test_chat_applies_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    assert tokenizer.decode(out[0].prompt_token_ids, skip_special_tokens=False).startswith("<|im_start|>user\nhi")
