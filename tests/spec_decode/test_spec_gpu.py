"""Speculative decoding on CUDA: verification rows replay the per-query-length decode graphs (LM head after the
replay), rows are padded to one draft count, the draft model runs beside the target (its one-token steps on its
own graphs); greedy output equals plain
decoding's and both KV caches end empty. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from test_spec_engine import GREEDY, TEXTS, _assert_no_leak, _ids, draft, ngram

from tokenmill.engine.llm import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = dict(dtype="float32", block_size=16, num_kv_blocks=64, max_model_len=128, device="cuda")


@pytest.mark.parametrize("method", ["ngram", "draft-self"])
def test_greedy_on_cuda_graphs_is_token_identical(tiny_llama_dir, method):
    reference = _ids(LLM(str(tiny_llama_dir), **CUDA).generate(TEXTS, GREEDY, use_tqdm=False))
    spec = ngram(k=4, adaptive=False) if method == "ngram" else draft(tiny_llama_dir, k=4, adaptive=False)
    llm = LLM(str(tiny_llama_dir), **CUDA, speculative_config=spec)
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.query_lens == [1, 2, 3, 4, 5]
    assert _ids(llm.generate(TEXTS, GREEDY, use_tqdm=False)) == reference
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0
    if method == "draft-self":  # the draft's one-token steps replayed its own graphs and proposed the target's ids
        assert llm.engine.scheduler.draft_proposer.proposer.graphs is not None
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    _assert_no_leak(llm)


def test_a_reduced_draft_vocabulary_on_cuda_graphs(tiny_llama_dir, tmp_path):
    """The target drafting for itself from the ids of its own greedy outputs (spec_decode/draft_vocab.py): the
    draft's graphs end in the N-row head, every draft is accepted, output equals plain decoding's."""
    import shutil

    from tokenmill.spec_decode.draft_vocab import count_token_ids, write_draft_vocab

    reference = _ids(LLM(str(tiny_llama_dir), **CUDA).generate(TEXTS, GREEDY, use_tqdm=False))
    model = tmp_path / "draft"
    shutil.copytree(tiny_llama_dir, model)
    vocab = LLM(str(tiny_llama_dir), **CUDA).engine.model.vocab_size
    counts = count_token_ids([torch.tensor(ids) for ids in reference], vocab)
    write_draft_vocab(model, counts, int((counts > 0).sum()))
    llm = LLM(str(tiny_llama_dir), **CUDA, speculative_config=draft(model, k=4, adaptive=False))
    proposer = llm.engine.scheduler.draft_proposer.proposer
    assert proposer.graphs is not None and proposer.vocab_ids.numel() == int((counts > 0).sum()) < vocab
    assert _ids(llm.generate(TEXTS, GREEDY, use_tqdm=False)) == reference
    stats = llm.engine.get_stats().spec_decode
    assert stats.num_drafts > 0 and stats.num_accepted_tokens == stats.num_draft_tokens
    _assert_no_leak(llm)
