"""Build bare sequences for scheduler / block-manager tests (no model, no tokenizer)."""

from __future__ import annotations

from tokenmill.engine.sequence import Request, Sequence
from tokenmill.sampling_params import SamplingParams


def make_seq(seq_id: str, prompt: list[int], max_tokens: int = 8, leader: Sequence | None = None) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    request = Request(seq_id, None, prompt, params)
    seq = Sequence(seq_id, 0, request, prompt, params, seed=None, detokenizer=None, leader=leader)
    request.sequences.append(seq)
    return seq
