"""SpeculativeDecoder: the scheduler's ``DraftProposer`` — asks a proposer for drafts, lets the adaptive policy
pick how many per step, and keeps the acceptance statistics the engine reports.

Built from ``SpeculativeConfig`` by ``build_speculative_decoder``. The scheduler calls ``propose_batch`` once per
step with every decoding sequence that may speculate, ``observe`` when a verification row lands (the engine),
``observe_step`` when any step lands (the engine's launch-to-landing time: the policy's step-cost measurements) and
``release`` when a sequence finishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tokenmill.config import SpeculativeConfig
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.mode_gate import ModeGate
from tokenmill.spec_decode.policy import NO_DRAFTS, AdaptivePolicy
from tokenmill.spec_decode.stats import SpecDecodeStats
from tokenmill.spec_decode.step_cost import measured_step_cost

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class DraftRequest:
    """One decoding sequence the scheduler may verify drafts for: at most ``max_num_tokens`` of them."""

    seq_id: str
    token_ids: list[int]  # prompt + accepted output ids (read-only)
    max_num_tokens: int
    params: SamplingParams | None = None  # a draft model samples its drafts like the request (None: greedy)
    seed: int | None = None  # the sequence's seed: a seeded request's drafts are reproducible too


class Proposer(Protocol):
    """Proposes up to ``k`` drafts for each request (all requests at once, so a draft model batches them)."""

    def propose_many(self, requests: list[DraftRequest], k: int) -> dict[str, list[int]]: ...

    def release(self, seq_id: str) -> None: ...


class SpeculativeDecoder:
    def __init__(self, proposer: Proposer, policy: AdaptivePolicy, pad_to_uniform: bool = False) -> None:
        """``pad_to_uniform``: give every row of a step the same number of drafts (a row with fewer proposals gets
        filler ids, verified like any draft) so that the step keeps one query length and replays a CUDA graph."""
        self.proposer = proposer
        self.policy = policy
        self.pad_to_uniform = pad_to_uniform
        self.stats = SpecDecodeStats()
        # An overlapping engine asks ``active`` once per step: the gate picks overlapped plain steps or synchronous
        # speculative ones by measured throughput (mode_gate.py); proposals follow its choice.
        self.gate = ModeGate()
        self.speculating = True
        self.log_interval_s = 10.0
        self._logged = SpecDecodeStats()
        self._next_log = time.monotonic() + self.log_interval_s

    @property
    def max_k(self) -> int:
        return self.policy.max_k

    def active(self, num_running: int, prompt_work: Callable[[], bool] = lambda: False) -> bool:
        """Whether the next step of ``num_running`` sequences may get drafts (else the engine keeps overlapping
        steps). Asked once per step by an engine that overlaps them; an adaptive policy's answer is the gate's.
        ``prompt_work``: asked only where speculation could pay (it walks every running sequence: at a batch past
        the ridge it is never asked), whether prompts wait or are mid-prefill, so the next step carries prompt
        tokens; an adaptive policy then keeps overlap (no drafts): such a step is large and the gate cannot compare
        modes on it."""
        self.speculating = self.policy.may_speculate(num_running) and (
            not self.policy.adaptive or (not prompt_work() and self.gate.choose(num_running)))
        return self.speculating

    def observe_cycle(self, batch: int, speculative: bool, tokens: int, seconds: float) -> None:
        """A decode-only step of ``batch`` rows in that mode gained ``tokens`` in ``seconds`` (landing to landing)."""
        self.gate.record(batch, speculative, tokens, seconds)

    def propose(self, seq_id: str, token_ids: list[int], max_num_tokens: int) -> list[int]:
        """The single-sequence DraftProposer call (a batch of one)."""
        return self.propose_batch([DraftRequest(seq_id, token_ids, max_num_tokens)]).get(seq_id, [])

    @property
    def feature_sink(self) -> Any:
        """Where the runner hands every step's hidden states (an EAGLE proposer), or None."""
        return getattr(self.proposer, "feature_sink", None)

    @property
    def draft_probs(self) -> dict | None:
        """request id -> [k, V] distribution of its drafts this step (a sampling draft model), for the runner."""
        return getattr(self.proposer, "draft_probs", None)

    def propose_batch(self, requests: list[DraftRequest], num_other_tokens: int = 0) -> dict[str, list[int]]:
        plan = (self.policy.plan([r.seq_id for r in requests], num_other_tokens, uniform=self.pad_to_uniform)
                if self.speculating else NO_DRAFTS)
        k = plan.k
        if k == 0:
            probs = self.draft_probs
            if probs:  # last step's distributions must not meet this step's rows
                probs.clear()
            return {}
        if len(plan.seq_ids) < len(requests):
            chosen = set(plan.seq_ids)
            requests = [r for r in requests if r.seq_id in chosen]
        drafts = self.proposer.propose_many(requests, k)
        if self.pad_to_uniform:
            for request in requests:
                want = min(k, request.max_num_tokens)
                row = drafts.get(request.seq_id) or []
                if len(row) < want:  # filler: repeat the last id (a repetition the target may even accept)
                    last = row[-1] if row else request.token_ids[-1]
                    drafts[request.seq_id] = row + [last] * (want - len(row))
        return drafts

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A target step of ``num_tokens`` query tokens landed ``seconds`` after its launch (the policy's costs)."""
        self.policy.observe_step(num_tokens, seconds)

    def observe(self, seq_id: str, num_drafts: int, num_accepted: int) -> None:
        self.stats.observe(num_drafts, num_accepted)
        self.policy.observe(seq_id, num_drafts, num_accepted)
        now = time.monotonic()
        if now >= self._next_log:
            self._log_window(now)

    def _log_window(self, now: float) -> None:
        """One log line per interval with the window's acceptance (vLLM logs the same figures)."""
        window = self.stats.since(self._logged)
        self._logged, self._next_log = self.stats.copy(), now + self.log_interval_s
        if window.num_drafts:
            logger.info("speculative decoding: acceptance rate %.3f, mean acceptance length %.2f, %d drafts, "
                        "%d draft tokens, accepted per position %s", window.acceptance_rate,
                        window.mean_acceptance_length, window.num_drafts, window.num_draft_tokens,
                        window.accepted_per_pos)

    def release(self, seq_id: str) -> None:
        self.proposer.release(seq_id)
        self.policy.release(seq_id)


class NgramBatchProposer:
    """``NgramProposer`` behind the batch interface (no model: one lookup per sequence)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        from tokenmill.spec_decode.ngram import NgramProposer

        self.ngram = NgramProposer(min_n, max_n)

    def propose_many(self, requests: list[DraftRequest], k: int) -> dict[str, list[int]]:
        out = {}
        for r in requests:
            drafts = self.ngram.propose(r.seq_id, r.token_ids, min(k, r.max_num_tokens))
            if drafts:
                out[r.seq_id] = drafts
        return out

    def release(self, seq_id: str) -> None:
        self.ngram.release(seq_id)


def build_speculative_decoder(config: SpeculativeConfig, target: Any, device: str,
                              pad_to_uniform: bool) -> SpeculativeDecoder:
    """The decoder a config asks for; ``target``: the loaded target engine parts the draft model must match
    (``LLMEngine``: tokenizer, vocabulary, max_model_len)."""
    draft_cost = 0.0
    if config.method == "ngram":
        proposer: Proposer = NgramBatchProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    elif config.method == "eagle":
        from tokenmill.spec_decode.eagle_proposer import EagleProposer

        eagle = EagleProposer.for_target(config, target, device)
        proposer = eagle
        draft_cost = eagle.num_weights_per_token / max(1, _weights_per_token(target.model))
    else:
        from tokenmill.spec_decode.draft_model import DraftModelProposer

        draft = DraftModelProposer.for_target(config, target, device)
        proposer = draft
        draft_cost = _weights_per_token(draft.model) / max(1, _weights_per_token(target.model))
    # The ridge is the prior until the engine's own steps are measured (step_cost.py).
    policy = AdaptivePolicy(config.num_speculative_tokens, measured_step_cost(device), adaptive=config.adaptive,
                            disable_by_batch_size=config.disable_by_batch_size, draft_cost=draft_cost)
    return SpeculativeDecoder(proposer, policy, pad_to_uniform=pad_to_uniform)


def _weights_per_token(model: Any) -> int:
    """Weights one token's forward reads: every parameter but the input embedding table (a lookup reads one row),
    plus the output head's rows (the tied table again, or a reduced draft vocabulary's N rows)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    skip = {id(t) for t in (getattr(embed, "weight", None), head) if t is not None}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip) + (head.numel() if head is not None else 0)
