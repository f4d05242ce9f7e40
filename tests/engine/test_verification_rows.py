"""Verification rows (speculative decoding's step): a decoding sequence scheduled with k draft tokens.

Drafts equal to the model's own greedy continuation give plain decoding's tokens, k + 1 per step; wrong drafts are
rolled back (computed tokens, KV blocks) and the output is still plain decoding's, the cache ends empty and the
prefix cache never holds a rejected token. With prefix caching on and off, and with two tensor-parallel ranks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tokenmill import SamplingParams
from tokenmill.engine.block_manager import chain_hash
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling.acceptance import accept_drafts

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Paris is",
    "The quick brown fox jumps over the lazy dog. Continuous batching",
    "def add(a, b):\n    return",
]
K = 3
BLOCK = 4
PARAMS = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    # Penalties read the history: position i of a verification row must see drafts[:i] after the accepted ids.
    "penalties": SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=1.4,
                                frequency_penalty=0.6, presence_penalty=0.3),
}
ENGINE_ARGS = dict(dtype="float32", block_size=BLOCK, num_kv_blocks=48, max_model_len=128)
# On CUDA: the Triton backend, decode graphs for the plain steps, the prefill kernel for verification rows.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs a CUDA GPU")])]


class ScriptedProposer:
    """Proposes the reference continuation, with every ``wrong_every``-th draft position corrupted (0: never)."""

    def __init__(self, reference: dict[str, list[int]], vocab: int, wrong_every: int = 0) -> None:
        self.reference, self.vocab, self.wrong_every = reference, vocab, wrong_every
        self.calls = 0

    def propose(self, seq_id: str, token_ids: list[int], max_num_tokens: int) -> list[int]:
        self.calls += 1
        drafts = self.reference[seq_id][len(token_ids) : len(token_ids) + min(K, max_num_tokens)]
        if self.wrong_every:
            cut = self.calls % (len(drafts) + 1)  # the first `cut` drafts are right, the rest wrong
            drafts = drafts[:cut] + [(t + 1 + self.calls) % self.vocab for t in drafts[cut:]]
        return drafts


def _engine(model_dir, caching: bool, tp: int = 1, proposer=None, device: str = "cpu") -> LLMEngine:
    return LLMEngine.from_kwargs(model=str(model_dir), enable_prefix_caching=caching, tensor_parallel_size=tp,
                                 draft_proposer=proposer, device=device, **ENGINE_ARGS)


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, prefix: str = "r"):
    """Generate to the end; returns {id: output ids} and {id: tokens gained per step that gained any}."""
    for i, ids in enumerate(prompts):
        engine.add_request(f"{prefix}{i}", ids, params)
    outputs: dict[str, list[int]] = {}
    gains: dict[str, list[int]] = {f"{prefix}{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished_requests() or engine.in_flight is not None:
        for out in engine.step():
            ids = out.outputs[0].token_ids
            gains[out.request_id].append(len(ids) - len(outputs.get(out.request_id, [])))
            outputs[out.request_id] = ids
        bm = engine.block_manager
        for seq in engine.scheduler.running:  # rejected drafts' blocks went back when their step landed
            # (with async scheduling on CUDA one step is still in flight: its query tokens, drafts included, are
            # computed and hold their slots until it lands)
            assert len(seq.block_table) <= bm.blocks_needed(max(seq.num_tokens, seq.num_computed_tokens))
    return outputs, gains


def _assert_cache_holds_only(engine: LLMEngine, full_sequences: list[list[int]]) -> None:
    """Every prefix-cache entry is a block of some sequence's accepted ids, keyed by its accepted chain."""
    valid = set()
    for ids in full_sequences:
        parent = None
        for i in range(len(ids) // BLOCK):
            parent = chain_hash(parent, tuple(ids[i * BLOCK : (i + 1) * BLOCK]))
            valid.add(parent)
    bm = engine.block_manager
    assert set(bm.cached) <= valid
    for key, block_id in bm.cached.items():
        assert bm.blocks[block_id].block_hash == key


@pytest.fixture(scope="module")
def setup(tiny_llama_dir):
    model_dir = tiny_llama_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, [tokenizer.encode(t) for t in TEXTS], len(tokenizer)


def test_acceptance_is_the_longest_agreeing_prefix_plus_one():
    assert accept_drafts([], [7]) == [7]
    assert accept_drafts([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]  # all accepted + the bonus token
    assert accept_drafts([1, 2, 3], [1, 5, 3, 4]) == [1, 5]  # the target's token replaces the first miss
    assert accept_drafts([1, 2, 3], [9, 2, 3, 4]) == [9]
    with pytest.raises(ValueError, match="2 drafts need 3 sampled tokens"):
        accept_drafts([1, 2], [1, 2])


_REFERENCES: dict[tuple[str, str], dict[str, list[int]]] = {}


def _reference(model_dir, prompts, case: str, device: str = "cpu") -> dict[str, list[int]]:
    """Plain decoding's prompt + output ids per request id (computed once per case and device)."""
    if (case, device) not in _REFERENCES:
        outputs, _ = _run(_engine(model_dir, caching=False, device=device), prompts, PARAMS[case])
        _REFERENCES[case, device] = {rid: prompts[int(rid[1:])] + ids for rid, ids in outputs.items()}
    return _REFERENCES[case, device]


def _check(engine, prompts, params, reference, wrong: bool, caching: bool):
    outputs, gains = _run(engine, prompts, params)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    for rid, ids in outputs.items():
        prompt = prompts[int(rid[1:])]
        assert prompt + ids == reference[rid], rid
        if not wrong:  # the prefill's token, then k + 1 per step until the token limit leaves less room
            left, expected = params.max_tokens - 1, [1]
            while left:
                expected.append(min(K + 1, left))
                left -= expected[-1]
            assert gains[rid] == expected, rid
    if wrong:
        assert any(g < K + 1 for rid in gains for g in gains[rid][1:])  # some drafts were rejected
    if caching:
        assert bm.cached  # full blocks of accepted tokens were registered
        _assert_cache_holds_only(engine, list(reference.values()))
    else:
        assert not bm.cached


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("case", list(PARAMS))
def test_drafts_give_plain_decoding_tokens_and_wrong_ones_roll_back(setup, caching, case, device):
    model_dir, prompts, vocab = setup
    params = PARAMS[case]
    reference = _reference(model_dir, prompts, case, device)
    for wrong in (0, 2):
        proposer = ScriptedProposer(reference, vocab, wrong_every=wrong)
        engine = _engine(model_dir, caching, proposer=proposer, device=device)
        _check(engine, prompts, params, reference, bool(wrong), caching)
        assert proposer.calls


def test_the_runner_drops_the_state_of_finished_requests(setup):
    model_dir, prompts, _ = setup
    engine = _engine(model_dir, caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=3)
    _run(engine, prompts, params, prefix="a")
    _run(engine, prompts, params, prefix="b")
    # The first round's state went with the second round's first record; the second's waits for the next one.
    assert set(engine.runner.batch.requests) == {f"b{i}" for i in range(len(prompts))}
    assert sorted(engine.scheduler.finished_seq_ids) == sorted(engine.runner.batch.requests)


def test_verification_rows_with_two_tensor_parallel_ranks(setup):
    model_dir, prompts, vocab = setup
    params = PARAMS["greedy"]
    reference = _reference(model_dir, prompts, "greedy")
    proposer = ScriptedProposer(reference, vocab)
    engine = _engine(model_dir, True, tp=2, proposer=proposer)
    try:
        _check(engine, prompts, params, reference, wrong=False, caching=True)
        proposer.wrong_every = 2
        _check(engine, prompts, params, reference, wrong=True, caching=True)
    finally:
        engine.shutdown()
