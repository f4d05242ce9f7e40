"""The batched grammar bitmask and the overlapped constrained step.

- GrammarBitmask (one multithreaded fill for all rows, reused buffers, one copy) masks exactly what each row's
  matcher allows, checked against a per-row fill unpacked bit by bit here; on CUDA at Llama-3's 128,256 ids.
- A grammar no token of the vocabulary can start is refused at compile time (a random-weight preset's
  ``t<id>`` tokenizer and JSON: the H100 benchmark's constrained rows all stopped after one rejected token).
- A random-weight engine whose grammars use the synthetic BPE-like vocabulary decodes every requested token.
- Landing the previous step between a constrained step's forward pass and its sampling (the overlap) gives
  the same greedy tokens as synchronous steps, and it does happen.
"""

from __future__ import annotations

import random

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.model.synthetic_tokenizer import build_hf_tokenizer
from tokenmill.structured.bitmask import GrammarBitmask
from tokenmill.structured.compiler import GrammarCompiler, GrammarError
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.structured.synthetic_vocab import synthetic_tokenizer_info

xgr = pytest.importorskip("xgrammar")

ITEM = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "name": {"type": "string", "maxLength": 6}, "ok": {"type": "boolean"}},
        "required": ["id", "name", "ok"]}
ENDLESS = {"type": "array", "items": ITEM, "minItems": 1000}  # cannot end within any max_tokens used here
cuda = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU")])


def synthetic_compiler(vocab: int, stop: int) -> GrammarCompiler:
    return GrammarCompiler(None, vocab, {stop}, tokenizer_info=synthetic_tokenizer_info(vocab, [stop]))


def allowed_tokens(grammar, vocab: int) -> torch.Tensor:
    """Row mask from a single-row fill, unpacked here bit by bit (bit j of word w is token 32 w + j)."""
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    grammar.matcher.fill_next_token_bitmask(bitmask)
    bits = (bitmask[0].to(torch.int64).unsqueeze(1) >> torch.arange(32)) & 1
    return bits.reshape(-1)[:vocab].bool()


def walk(grammar, vocab: int, steps: int, rng: random.Random) -> None:
    """Advance along ``steps`` random allowed tokens (rows in varied grammar states)."""
    for _ in range(steps):
        choices = allowed_tokens(grammar, vocab).nonzero().flatten().tolist()
        assert grammar.advance(rng.choice(choices)) is False


@pytest.mark.parametrize("device", ["cpu", cuda])
def test_batched_bitmask_masks_what_each_row_allows(device):
    vocab = 128256 if device == "cuda" else 4099  # Llama-3's width on CUDA; not a multiple of 32 on CPU
    stop = vocab - 1
    compiler = synthetic_compiler(vocab, stop)
    rng = random.Random(0)
    endless = StructuredOutputsParams(json=ENDLESS)
    grammars = [compiler.matcher(endless) for _ in range(5)]
    for steps, grammar in enumerate(grammars):
        walk(grammar, vocab, 3 * steps, rng)
    ended = compiler.matcher(StructuredOutputsParams(choice=["a"]))
    assert ended.advance(ord("a")) is False and ended.advance(stop) is True  # a finished row: surplus
    bitmask = GrammarBitmask(max_threads=2)
    for rows in ([grammars[0], None, grammars[1], ended, grammars[2]], grammars, grammars[3:]):  # grow, shrink
        logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(len(rows)))
        expected = logits.clone()
        for i, grammar in enumerate(rows):
            if grammar is not None and grammar.needs_mask:
                expected[i, ~allowed_tokens(grammar, vocab)] = float("-inf")
        raw = logits.to(device)
        masked = bitmask.apply(raw, rows, copy=True)
        assert torch.equal(masked.cpu(), expected)
        assert torch.equal(raw.cpu(), logits)  # copy=True leaves the caller's logits alone
        assert bitmask.apply(raw, rows, copy=False) is raw and torch.equal(raw.cpu(), expected)
    assert bitmask.stats.num_fills == 6 and bitmask.stats.num_rows == 2 * (3 + 5 + 2)


def test_compiler_refuses_a_grammar_the_vocabulary_cannot_start():
    words = GrammarCompiler(build_hf_tokenizer(1000, [999]), 1000, {999})  # a preset's t<id> tokenizer
    with pytest.raises(GrammarError, match="no token of the model's vocabulary can start"):
        words.compile(StructuredOutputsParams(json=ENDLESS))
    words.compile(StructuredOutputsParams(regex="t1( t2)*"))  # what its words spell compiles


def _constrained_run(llm: LLM, batch: int, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True,
                            structured_outputs={"json": ENDLESS})
    prompts = [[100 + 7 * i + j for j in range(6)] for i in range(batch)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("device", ["cpu", cuda])
def test_random_weight_engine_decodes_every_constrained_token(device):
    """What the benchmark does: a random-weight preset with the synthetic grammar vocabulary; every row must
    produce all max_tokens tokens, each accepted by the grammar."""
    preset = "tiny-llama3" if device == "cuda" else "tiny-llama"
    llm = LLM(None, random_weights=preset, device=device, dtype="float32", max_num_seqs=8, async_scheduling=True)
    engine = llm.engine
    engine.grammars = synthetic_compiler(engine.model.vocab_size, min(engine.eos_token_ids))
    outputs = _constrained_run(llm, 6, 12)
    compiled = engine.grammars.compile(StructuredOutputsParams(json=ENDLESS))
    for ids in outputs:
        assert len(ids) == 12
        matcher = xgr.GrammarMatcher(compiled)
        assert all(matcher.accept_token(token) for token in ids)


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 50},
                                      "b": {"enum": ["x", "y", "z"]}}, "required": ["a", "b"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 4},
]


def _greedy(model_dir, async_scheduling: bool, device: str, finish_early: bool) -> tuple[list, int]:
    llm = LLM(str(model_dir), device=device, dtype="float32", block_size=4, async_scheduling=async_scheduling)
    overlapped = 0
    launch = llm.engine.runner.launch

    def counting_launch(record, grammars=None, before_sampling=None):
        nonlocal overlapped
        overlapped += before_sampling is not None
        return launch(record, grammars, before_sampling)

    llm.engine.runner.launch = counting_launch
    strings = {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1000}
    specs = [{"json": ENDLESS}, {"json": strings}, None]  # none of them can end within max_tokens
    if finish_early:  # rows whose grammar ends mid-batch leave surplus rows in the overlapped next step
        specs += [{"json": schema, "disable_any_whitespace": True} for schema in SCHEMAS]
        specs.append({"choice": ["yes", "no", "maybe"]})
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, structured_outputs=spec)
              for spec in specs]
    prompts = [f"Answer {i}: the quick brown fox" for i in range(len(params))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outputs], overlapped


def test_greedy_constrained_tokens_identical_with_and_without_overlap(tiny_llama_dir):
    sync, sync_overlapped = _greedy(tiny_llama_dir, False, "cpu", finish_early=True)
    overlapped, num_overlapped = _greedy(tiny_llama_dir, True, "cpu", finish_early=True)
    assert overlapped == sync
    assert sync_overlapped == 0 and num_overlapped > 0
    assert [reason for _, reason in sync[3:]] == ["stop"] * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_greedy_constrained_tokens_identical_with_and_without_overlap(tiny_llama_dir):
    """Rows that all run to max_tokens keep every step's batch the same in both modes (no batch-size effect)."""
    sync, _ = _greedy(tiny_llama_dir, False, "cuda", finish_early=False)
    overlapped, num_overlapped = _greedy(tiny_llama_dir, True, "cuda", finish_early=False)
    assert overlapped == sync and num_overlapped > 0
    assert all(reason == "length" for _, reason in sync)
