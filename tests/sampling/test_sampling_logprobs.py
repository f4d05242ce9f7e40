"""Logprobs: sampled token plus top-k, values from log_softmax of the raw logits, ranks from 1."""

from __future__ import annotations

import torch
from conftest import make_row

from tokenmill.sampling import Sampler, prompt_logprobs


def test_top_k_logprobs_match_log_softmax_with_ranks(device):
    torch.manual_seed(0)
    logits = torch.randn(2, 30, device=device)
    rows = [make_row(device, logprobs=5), make_row(device, temperature=0.0, logprobs=2)]
    out = Sampler(set())(logits, rows)
    expected = torch.log_softmax(logits, dim=-1).cpu()
    for i, k in ((0, 5), (1, 2)):
        entry = out.logprobs[i]
        assert out.token_ids[i] in entry
        order = expected[i].argsort(descending=True).tolist()
        for rank, token in enumerate(order[:k], start=1):
            assert entry[token].rank == rank
            assert abs(entry[token].logprob - float(expected[i, token])) < 1e-5
        sampled = out.token_ids[i]
        assert entry[sampled].rank == order.index(sampled) + 1
        assert abs(entry[sampled].logprob - float(expected[i, sampled])) < 1e-5
        assert len(entry) in (k, k + 1)


def test_logprobs_come_from_raw_logits_and_include_an_unlikely_sampled_token(device):
    logits = torch.tensor([[5.0, 1.0, 3.0, 0.0]], device=device)
    # EOS (token 0) is blocked by min_tokens and greedy picks token 2, the second most likely raw token;
    # the repetition penalty on it (3.0 -> 2.5) must not change the reported values.
    row = make_row(
        device, temperature=0.0, min_tokens=1, logprobs=0, output=[], repetition_penalty=1.2, prompt=[2]
    )
    out = Sampler(eos_token_ids={0})(logits, [row])
    raw = torch.log_softmax(logits, dim=-1).cpu()
    assert out.token_ids == [2]
    assert set(out.logprobs[0]) == {2}
    assert out.logprobs[0][2].rank == 2
    assert abs(out.logprobs[0][2].logprob - float(raw[0, 2])) < 1e-6


def test_rows_without_logprobs_get_none(device):
    logits = torch.randn(3, 10, device=device)
    out = Sampler(set())(logits, [make_row(device), make_row(device, logprobs=1), make_row(device)])
    assert out.logprobs[0] is None and out.logprobs[2] is None
    assert out.logprobs[1] is not None and out.token_ids[1] in out.logprobs[1]


def test_prompt_logprobs_score_next_tokens(device):
    torch.manual_seed(1)
    logits = torch.randn(4, 12, device=device)
    next_ids = torch.tensor([3, 0, 11, 5], device=device)
    entries = prompt_logprobs(logits, next_ids, 3)
    expected = torch.log_softmax(logits, dim=-1).cpu()
    for t, entry in enumerate(entries):
        token = int(next_ids[t])
        assert abs(entry[token].logprob - float(expected[t, token])) < 1e-5
        top = expected[t].topk(3).indices.tolist()
        assert [entry[tok].rank for tok in top] == [1, 2, 3]


def test_bfloat16_logits_are_accepted(device):
    torch.manual_seed(2)
    logits = torch.randn(3, 64, device=device).to(torch.bfloat16)
    rows = [
        make_row(device, temperature=0.0, logprobs=2),
        make_row(device, seed=3),
        make_row(device, top_p=0.5),
    ]
    out = Sampler(set())(logits, rows)
    assert out.token_ids[0] == int(logits[0].float().argmax())
    expected = torch.log_softmax(logits[0].float(), dim=-1)
    assert abs(out.logprobs[0][out.token_ids[0]].logprob - float(expected[out.token_ids[0]])) < 1e-5
