"""Constrained decoding through the real engine on a tiny random Llama: whatever the weights want, every
finished output matches its schema / choice / regex / grammar, on every sampling path (greedy, seeded
exponential race, top-k/top-p filtered; the fused Gumbel kernel on CUDA), and async scheduling still gives
the synchronous results.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.structured.params import StructuredOutputsParams

jsonschema = pytest.importorskip("jsonschema")
xgr = pytest.importorskip("xgrammar")

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 50},
                                      "b": {"enum": ["x", "y", "z"]}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "tags": {"type": "array", "items": {"enum": ["p", "q"]}, "maxItems": 3}},
     "required": ["ok", "tags"]},
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                                      "inner": {"type": "object", "properties": {"n": {"type": "number"}},
                                                "required": ["n"]}},
     "required": ["name", "inner"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
]
# (temperature, top_k, top_p): greedy, plain random, filtered.
SAMPLING = [(0.0, -1, 1.0), (0.8, -1, 1.0), (1.3, 20, 0.9)]
PROMPTS = ["The quick brown fox", "Paris is the capital", "def add(a, b):"]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), device="cpu", dtype="float32")


def _params(spec: dict, seed: int, sampling: tuple, **kw) -> SamplingParams:
    temperature, top_k, top_p = sampling
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_tokens=64,
                          structured_outputs=spec, **kw)


def _is_prefix(llm: LLM, spec: dict, text: str) -> bool:
    """A length-capped output is a prefix the grammar accepts (the mask held at every token)."""
    grammar = llm.engine.grammars.compile(StructuredOutputsParams.from_value(spec))
    return xgr.GrammarMatcher(grammar).accept_string(text)


@pytest.mark.parametrize("schema_index", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(llm, schema_index):
    schema = SCHEMAS[schema_index]
    spec = {"json": schema}
    params = [_params(spec, seed, sampling) for seed in range(2) for sampling in SAMPLING]
    outputs = llm.generate([PROMPTS[i % len(PROMPTS)] for i in range(len(params))], params, use_tqdm=False)
    finished = 0
    for output in outputs:
        choice = output.outputs[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.text), schema)
            finished += 1
        else:
            assert choice.finish_reason == "length" and _is_prefix(llm, spec, choice.text)
    assert finished >= 1, "some outputs of these bounded schemas should finish (and so be validated)"


def test_choice_regex_grammar_and_json_object(llm):
    cases = [
        ({"choice": ["positive", "negative", "neutral"]}, lambda t: t in ("positive", "negative", "neutral")),
        ({"regex": r"[0-9]{3}-[a-z]{2,4}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) is not None),
        ({"grammar": 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "nil"'},
         lambda t: re.fullmatch(r"\((?:[a-c]|nil)(?:,(?:[a-c]|nil))*\)", t) is not None),
        ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, check in cases:
        params = [_params(spec, seed, sampling) for seed in range(3) for sampling in SAMPLING]
        outputs = llm.generate(["Classify: great product"] * len(params), params, use_tqdm=False)
        for output in outputs:
            choice = output.outputs[0]
            if choice.finish_reason == "stop":
                assert check(choice.text), (spec, choice.text)
            else:  # json_object strings may run to max_tokens under random weights
                assert _is_prefix(llm, spec, choice.text), (spec, choice.text)
        if "json_object" not in spec:
            assert all(o.outputs[0].finish_reason == "stop" for o in outputs), spec


def test_n_sequences_each_follow_the_grammar_and_ignore_eos_ends_with_it(llm):
    spec = {"choice": ["alpha", "beta", "gamma"]}
    [output] = llm.generate(["pick"], _params(spec, 3, SAMPLING[1], n=4, ignore_eos=True), use_tqdm=False)
    assert len(output.outputs) == 4
    assert all(c.text in ("alpha", "beta", "gamma") and c.finish_reason == "stop" for c in output.outputs)


def _run(model_dir, async_scheduling: bool, device: str = "cpu"):
    llm = LLM(str(model_dir), device=device, dtype="float32", block_size=4, async_scheduling=async_scheduling)
    params = [
        SamplingParams(temperature=0.9, seed=1, max_tokens=40, structured_outputs={"json": SCHEMAS[0]}),
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),  # unconstrained, same batch
        SamplingParams(temperature=0.7, seed=5, max_tokens=20, structured_outputs={"regex": "[a-z]{2,8}!"}),
        SamplingParams(temperature=1.0, seed=9, max_tokens=12, ignore_eos=True),
    ]
    outputs = llm.generate(PROMPTS + PROMPTS[:1], params, use_tqdm=False)
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs]


def test_async_scheduling_with_constrained_rows_matches_sync(tiny_llama_dir):
    """Steps that sample a constrained row land before the next is scheduled; the results equal sync mode."""
    sync, overlapped = _run(tiny_llama_dir, False), _run(tiny_llama_dir, True)
    assert overlapped == sync
    jsonschema.validate(json.loads(sync[0][1]), SCHEMAS[0])
    assert re.fullmatch("[a-z]{2,8}!", sync[2][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_gumbel_path_respects_the_mask(tiny_llama_dir):
    """Temperature-only unseeded rows take the fused Gumbel kernel on CUDA; the mask must hold there too."""
    llm = LLM(str(tiny_llama_dir), device="cuda", dtype="float32")
    params = SamplingParams(temperature=1.0, max_tokens=96, structured_outputs={"json": SCHEMAS[0]})
    outputs = llm.generate(PROMPTS * 8, params, use_tqdm=False)
    for output in outputs:
        choice = output.outputs[0]
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.text), SCHEMAS[0])
        else:
            assert _is_prefix(llm, {"json": SCHEMAS[0]}, choice.text)
    assert _run(tiny_llama_dir, True, "cuda")[0][2] in ("stop", "length")
