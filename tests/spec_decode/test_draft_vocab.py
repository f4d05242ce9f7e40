"""A draft model with a reduced vocabulary (spec_decode/draft_vocab.py): the ranking file round-trips, bad sizes are
refused, the draft's head holds only N rows, and greedy output stays token-identical to plain decoding (the
sampled-distribution test is in test_spec_engine.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_spec_engine import BASE, GREEDY, TEXTS, _assert_no_leak, _generate, _ids, _reference, draft

from tokenmill.config import SpeculativeConfig
from tokenmill.engine.llm import LLM
from tokenmill.spec_decode.draft_vocab import (
    CONFIG_KEY,
    DRAFT_VOCAB_FILE,
    count_token_ids,
    load_draft_vocab,
    rank_token_ids,
    write_draft_vocab,
)


def copy_model(source: Path, directory: Path) -> Path:
    directory.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copy(path, directory / path.name)
    return directory


def vocab_size(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_ranking_is_by_count_then_id_and_round_trips(tiny_llama_dir, tmp_path):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    vocab = vocab_size(model)
    counts = count_token_ids([torch.tensor([5, 7, 7, 9, 9, 9]), torch.tensor([[3, 7], [9, 1]])], vocab)
    assert counts[9] == 4 and counts[7] == 3 and counts[5] == 1 and counts.sum() == 10
    ranking = rank_token_ids(counts)
    assert ranking[:5].tolist() == [9, 7, 1, 3, 5]  # 1, 3, 5: one each, by id
    assert ranking[5:8].tolist() == [0, 2, 4]  # then the unseen ids, by id
    assert sorted(ranking.tolist()) == list(range(vocab))

    write_draft_vocab(model, counts, 3)
    assert (model / DRAFT_VOCAB_FILE).is_file()
    assert json.loads((model / "config.json").read_text())[CONFIG_KEY] == 3
    assert load_draft_vocab(model, vocab).tolist() == [9, 7, 1]  # config.json's N
    assert load_draft_vocab(model, vocab, 5).tolist() == [9, 7, 1, 3, 5]  # the caller's N
    assert load_draft_vocab(model, vocab, vocab) is None  # the whole vocabulary: no subset
    assert load_draft_vocab(tiny_llama_dir, vocab) is None  # a draft without a ranking


def test_bad_sizes_and_a_missing_ranking_are_refused(tiny_llama_dir, tmp_path):
    model = copy_model(tiny_llama_dir, tmp_path / "m")
    vocab = vocab_size(model)
    counts = torch.ones(vocab, dtype=torch.int64)
    for bad in (0, vocab + 1):
        with pytest.raises(ValueError, match="must lie between 1 and the vocabulary size"):
            write_draft_vocab(model, counts, bad)
    assert not (model / DRAFT_VOCAB_FILE).exists()
    with pytest.raises(ValueError, match="needs the draft's token ranking"):
        load_draft_vocab(model, vocab, 8)
    write_draft_vocab(model, counts, 8)
    with pytest.raises(ValueError, match="must lie between 1 and the vocabulary size"):
        load_draft_vocab(model, vocab, vocab + 1)
    (model / DRAFT_VOCAB_FILE).unlink()
    with pytest.raises(ValueError, match="is missing"):
        load_draft_vocab(model, vocab)
    with pytest.raises(ValueError, match="draft_vocab_size applies to method"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, draft_vocab_size=8)
    with pytest.raises(ValueError, match="must be >= 1"):
        SpeculativeConfig(model=str(model), num_speculative_tokens=2, draft_vocab_size=0)


def _draft_with_ranking(source: Path, directory: Path, counts: torch.Tensor, size: int) -> Path:
    model = copy_model(source, directory)
    write_draft_vocab(model, counts, size)
    return model


def test_self_draft_over_its_own_outputs_tokens_has_every_draft_accepted(tiny_model_dirs, tmp_path):
    """The target drafting for itself from the ids of its own greedy outputs: each draft (the argmax among them) is
    the target's next token, so every one is accepted; the head holds only those rows."""
    target = tiny_model_dirs["llama"]
    expected = _reference(target)
    vocab = vocab_size(target)
    counts = count_token_ids([torch.tensor(ids) for ids in expected], vocab)
    size = int((counts > 0).sum())
    model = _draft_with_ranking(target, tmp_path / "self", counts, size)
    llm = LLM(str(target), **BASE, speculative_config=draft(model, adaptive=False))
    proposer = llm.engine.scheduler.draft_proposer.proposer
    assert proposer.vocab_ids.numel() == size < vocab
    assert tuple(proposer.model.lm_head.weight.shape) == (size, proposer.model.spec.hidden_size)
    assert _ids(_generate(llm, GREEDY)) == expected
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    _assert_no_leak(llm)


@pytest.mark.parametrize("size", [1, 16, 96])
def test_greedy_output_is_token_identical_with_a_reduced_vocabulary(tiny_model_dirs, tmp_path, size):
    """Another model as the draft, proposing from N ids ranked at random (N = 1: every draft is that one id):
    drafts are rejected often, the output is still plain decoding's."""
    target, other = tiny_model_dirs["llama"], tiny_model_dirs["qwen2"]
    generator = torch.Generator().manual_seed(size)
    counts = torch.randperm(vocab_size(other), generator=generator)
    model = _draft_with_ranking(other, tmp_path / "other", counts, size)
    llm = LLM(str(target), **BASE, speculative_config=draft(model, adaptive=False))
    assert _ids(_generate(llm, GREEDY)) == _reference(target)
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0
    proposer = llm.engine.scheduler.draft_proposer.proposer
    assert proposer.vocab_ids.tolist() == rank_token_ids(counts)[:size].tolist()
    _assert_no_leak(llm)


def test_the_speculative_config_overrides_the_drafts_size_and_full_size_turns_it_off(tiny_model_dirs, tmp_path):
    target = tiny_model_dirs["llama"]
    vocab = vocab_size(target)
    model = _draft_with_ranking(target, tmp_path / "d", torch.arange(vocab), 32)
    costs = []
    for size, rows in ((8, 8), (None, 32), (vocab, None)):
        llm = LLM(str(target), **BASE, speculative_config=draft(model, adaptive=False, draft_vocab_size=size))
        proposer = llm.engine.scheduler.draft_proposer.proposer
        assert (None if proposer.vocab_ids is None else proposer.vocab_ids.numel()) == rows
        assert _ids(_generate(llm, GREEDY, TEXTS[:1])) == _reference(target)[:1]
        costs.append(llm.engine.scheduler.draft_proposer.policy.draft_cost)
    # The policy's draft cost counts the head rows a draft token reads: the target drafting for itself costs 1.
    assert costs[0] < costs[1] < costs[2] == pytest.approx(1.0)
