"""ModelRunner: executes one step record — updates its persistent batch, builds tensors, runs the model, samples.

It returns token ids per request id (several for a verification row). With async scheduling the next step may
be launched before this one's ids are read: its inputs read them from this step's sampled-id tensor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.config import KVCacheSpec
from tokenmill.engine.step_record import StepRecord
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.stage_inputs import InFlightIds, stage_decode_inputs
from tokenmill.outputs import Logprob
from tokenmill.runner.cuda_graphs import DecodeGraphs
from tokenmill.runner.input_batch import InputBatch
from tokenmill.runner.inputs import ModelInputs, step_arrays, upload_step
from tokenmill.runner.piecewise_graphs import PiecewiseGraphs
from tokenmill.sampling.acceptance import accept_drafts
from tokenmill.sampling.sampler import Sampler, SamplingRow
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.rejection import DraftDistributionRow, draft_verifier

logger = logging.getLogger(__name__)


class FeatureSink(Protocol):
    """Takes the target's last hidden states (post final norm: what the LM head reads) of the positions each step
    computed: an EAGLE proposer drafts from them (spec_decode/eagle_proposer.py)."""

    def add_features(self, seq_id: str, start: int, features: torch.Tensor) -> None: ...


@dataclass
class StepResult:
    """Per request that sampled: the ids it gains, in order (one for a plain row, 1..k+1 for a verification
    row with k drafts), and their logprobs (None entries unless its params ask for them)."""

    token_ids: dict[str, list[int]]
    logprobs: dict[str, list[dict[int, Logprob] | None]]


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: sampled ids live on the device until ``result()`` reads them."""

    req_ids: list[str]  # requests that sample this step, in the order of their tokens in token_ids
    drafts: list[list[int]]  # per such request: its draft ids (k drafts: k + 1 entries in token_ids)
    token_ids: torch.Tensor  # [num_sampled] int64 on the model's device
    logprobs: list[dict[int, Logprob] | None]  # per entry of token_ids
    host_ids: torch.Tensor | None = None  # pinned copy being filled (CUDA)
    ready: torch.cuda.Event | None = None  # recorded after that copy
    watch: Callable[[], None] | None = None  # raises if the wait can never end (a dead tensor-parallel peer)

    def result(self) -> StepResult:
        """Wait for this step's sampled ids (only this step's: later queued work keeps running)."""
        if self.ready is not None and self.host_ids is not None:
            if self.watch is None:
                self.ready.synchronize()
            else:
                self._watched_wait(self.ready, self.watch)
            ids = self.host_ids.tolist()
        else:
            ids = self.token_ids.tolist()
        if len(ids) == len(self.req_ids):  # plain rows only: one token each
            return StepResult({r: [t] for r, t in zip(self.req_ids, ids, strict=True)},
                              {r: [lp] for r, lp in zip(self.req_ids, self.logprobs, strict=True)})
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[dict[int, Logprob] | None]] = {}
        start = 0
        for req_id, drafts in zip(self.req_ids, self.drafts, strict=True):
            end = start + len(drafts) + 1
            accepted = accept_drafts(drafts, ids[start:end])
            tokens[req_id] = accepted
            logprobs[req_id] = self.logprobs[start : start + len(accepted)]
            start = end
        return StepResult(tokens, logprobs)

    @staticmethod
    def _watched_wait(ready: torch.cuda.Event, watch: Callable[[], None], every_s: float = 0.005) -> None:
        """Poll the event (sleep(0) yields the GIL to the server's threads) and call ``watch`` every ``every_s``."""
        next_watch = time.monotonic() + every_s
        while not ready.query():
            if time.monotonic() >= next_watch:
                watch()
                next_watch = time.monotonic() + every_s
            time.sleep(0)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: str, dtype: torch.dtype, kv_spec: KVCacheSpec,
                 eos_token_ids: set[int], samples: bool = True) -> None:
        """``samples``: False on tensor-parallel ranks 1..N-1, which run the model but leave sampling to rank 0."""
        self.model = model
        self.attn_backend = model.attn_backend
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Softmax tails underflow into denormal floats, which x86 handles ~100x slower (a SmolLM2 decode
            # step measured 3.0 s with them, 0.17 s without). Flushing them to zero changes no result that
            # fp32 can represent next to the normal values they are summed with.
            torch.set_flush_denormal(True)
        self.dtype = dtype
        self.kv_spec = kv_spec
        self.block_size = kv_spec.block_size
        self.sampler = Sampler(eos_token_ids)
        self.kv_caches: KVCache | None = None
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None  # steps with prompts (cudagraph_mode FULL_AND_PIECEWISE)
        self.batch = InputBatch(self.device, samples)
        self.prev_sampled: torch.Tensor | None = None  # the last launched step's sampled ids (device)
        # Speculative decoding with a sampling draft model: request id -> the [k, V] distribution its drafts were
        # drawn from (filled by the proposer before the step; rank 0 only). Such rows are rejection-sampled.
        self.draft_probs: dict[str, torch.Tensor] | None = None
        # An EAGLE proposer's sink for every step's hidden states (None: the runner keeps only the sampled rows').
        self.feature_sink: FeatureSink | None = None

    def shutdown(self) -> None:
        """In-process runner: nothing to stop (the tensor-parallel executor stops its workers here)."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = KVCache(self.kv_spec, self.model.num_layers, num_blocks, self.device)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_sampled: int, max_seq_len: int | None = None) -> None:
        """One forward at the largest step size on a throwaway cache, so peak activation memory is measured:
        ``num_tokens`` prompt tokens as sequences of at most ``max_seq_len`` (a step of max_num_batched_tokens
        holds many prompts when max_model_len is shorter; profiling only max_model_len tokens under-counts it)."""
        seq_len = min(num_tokens, max_seq_len or num_tokens)
        lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        tables, num_blocks = [], 0
        for n in lens:
            blocks = self.kv_spec.blocks_for_tokens(n)
            tables.append(list(range(num_blocks, num_blocks + blocks)))
            num_blocks += blocks
        caches = KVCache(self.kv_spec, self.model.num_layers, num_blocks, self.device)
        meta = self.attn_backend.build_metadata(lens, lens, tables, self.block_size, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in lens]).to(self.device)
        hidden = self.model(ids, positions, caches, meta)
        logits = self.model.compute_logits(hidden[-1:].expand(num_sampled, -1))
        self._warm_up_sampler(logits)
        del caches, hidden, logits
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _warm_up_sampler(self, logits: torch.Tensor) -> None:
        """The sampler's heaviest path (penalty counts, a full-vocabulary top-p sort) at the largest batch counts
        toward the measured peak memory, and the fused sampling kernel's variants (one temperature for the batch,
        one per row) compile now rather than inside the first sampled request."""
        num_rows = logits.shape[0]
        heavy = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.1)
        for params in ([heavy] * num_rows, [SamplingParams(temperature=0.7)] * num_rows,
                       [SamplingParams(temperature=0.5 + 0.1 * (i % 2)) for i in range(num_rows)]):
            rows = [SamplingRow(p, [0], [0]) for p in params]
            self.sampler.sample(logits.clone(), rows, logits_writable=True)

    def capture_graphs(self, max_batch: int, max_model_len: int, query_lens: tuple[int, ...] = (1,)) -> None:
        """``query_lens``: 1, plus 1 + k for each k verification rows may have (speculative decoding)."""
        max_blocks = self.kv_spec.blocks_for_tokens(max_model_len)
        # With a feature sink every graph ends at the hidden states (the sink needs them; the LM head runs after).
        eager_logits_from = 1 if self.feature_sink is not None else 2
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_batch, max_blocks, self.device,
                                   query_lens, eager_logits_from=eager_logits_from)
        self.graphs.capture()
        self._warm_up_staging()

    def capture_piecewise_graphs(self, max_tokens: int) -> None:
        """Graphs of the pieces between attention calls for steps of up to ``max_tokens`` tokens."""
        self.piecewise = PiecewiseGraphs(self.model, max_tokens, self.device)
        self.piecewise.capture()

    def _warm_up_staging(self) -> None:
        """Compile both variants of the staging kernel (with and without tokens in flight) now, not mid-run."""
        if not HAS_TRITON or self.graphs is None or self.graphs.inputs is None:
            return
        ids = torch.zeros(1, dtype=torch.int64, device=self.device)
        lens = torch.ones(1, dtype=torch.int32, device=self.device)
        table = torch.zeros(1, 1, dtype=torch.int32, device=self.device)
        for in_flight in (None, InFlightIds(ids, ids)):
            stage_decode_inputs(self.graphs.inputs, ids, ids, ids, lens, table, 1, in_flight)
        torch.cuda.synchronize(self.device)

    def prepare_inputs(self, record: StepRecord) -> ModelInputs:
        """Apply the record to the persistent batch and upload the step's inputs (one host-to-device copy)."""
        self.batch.update(record)
        return upload_step(step_arrays(record, self.batch, self.block_size), self.device, self.prev_sampled,
                           backend=self.attn_backend)

    @torch.inference_mode()
    def forward_logits(self, record: StepRecord) -> tuple[torch.Tensor, list[int]]:
        """Logits [num_sampled_tokens, vocab] (model dtype) and which scheduled entries sample (a verification
        row with k drafts has k + 1 consecutive logit rows)."""
        inputs = self.prepare_inputs(record)
        if self.feature_sink is None:
            return self.run_model(inputs), inputs.sample_rows
        hidden = self.run_hidden(inputs)
        self._hand_features(record, hidden)
        return self.model.compute_logits(hidden.index_select(0, inputs.sample_indices)), inputs.sample_rows

    def _hand_features(self, record: StepRecord, hidden: torch.Tensor) -> None:
        """Each scheduled request's rows of ``hidden`` (its tokens are consecutive, in record order) to the sink."""
        offset = 0
        for entry in record.scheduled:
            self.feature_sink.add_features(entry.req_id, entry.num_computed_tokens,
                                           hidden[offset : offset + entry.num_tokens])
            offset += entry.num_tokens

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """Logits of the sampling rows: a captured graph for decode batches it covers, else piecewise graphs
        (with eager attention) when captured and the step fits, else eager."""
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            # The graph computed every token's logits (row-major by sequence); keep the sampled ones.
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, inputs.in_flight)
            if logits.shape[0] != inputs.sample_indices.shape[0]:  # e.g. a 1-token chunk mid-prompt
                logits = logits.index_select(0, inputs.sample_indices)
            return logits
        return self.model.compute_logits(self.run_hidden(inputs).index_select(0, inputs.sample_indices))

    def run_hidden(self, inputs: ModelInputs) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of every token of the step (the final norm's output). A graph's view
        is its output buffer, overwritten by the next replay."""
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            return self.graphs.run_hidden(inputs.input_ids, inputs.positions, inputs.meta, inputs.in_flight)
        if self.piecewise is not None and self.piecewise.can_run(inputs.positions.shape[0]):
            return self.piecewise.run(inputs.resolved_ids(), inputs.positions, self.kv_caches, inputs.meta)
        return self.model(inputs.resolved_ids(), inputs.positions, self.kv_caches, inputs.meta)

    @torch.inference_mode()
    def launch(self, record: StepRecord, grammars: dict[str, Any] | None = None,
               before_sampling: Callable[[], None] | None = None) -> LaunchedStep:
        """Queue the step's forward pass and sampling; the host waits only in ``LaunchedStep.result()``.
        ``grammars``: request id -> structured.RequestGrammar for the constrained rows (their masks are filled
        by the sampler; drafts and grammars are not combined yet). ``before_sampling`` runs once the forward
        pass is queued and before the masks are filled: the engine lands the previous step there, so the
        matchers take its tokens while the device computes this step's logits."""
        logits, rows = self.forward_logits(record)
        if before_sampling is not None:
            before_sampling()
        if not rows:
            self.prev_sampled = None
            return LaunchedStep([], [], torch.zeros(0, dtype=torch.int64, device=self.device), [])
        sampling_rows: list[SamplingRow] = []
        req_ids: list[str] = []
        drafts_per_row: list[list[int]] = []
        verified: list[DraftDistributionRow] = []
        for row in rows:
            entry = record.scheduled[row]
            state = self.batch.requests[entry.req_id]
            drafts = entry.draft_token_ids
            # Outputs before this step's first sampled token, counting one in flight (min_tokens reads it).
            num_outputs = entry.num_computed_tokens + entry.num_tokens - len(drafts) - state.prompt_len
            req_ids.append(entry.req_id)
            drafts_per_row.append(drafts)
            if not drafts:
                state.row.num_output_tokens = num_outputs
                if grammars and entry.req_id in grammars:  # a request's matcher is fixed for its life
                    state.row.grammar = grammars[entry.req_id]
                sampling_rows.append(state.row)
                continue
            # A verification row: one sampling row per position; position i's history has drafts[:i] after it.
            base = state.row
            probs = self.draft_probs.get(entry.req_id) if self.draft_probs else None
            # (Without them the ordinary draws verify: exact for drafts from anywhere, accepting less often.)
            if probs is not None and probs.shape[0] >= len(drafts) and not base.params.greedy:
                verified.append(DraftDistributionRow(len(sampling_rows), drafts, probs[: len(drafts)],
                                                     base.generator))
            for i in range(len(drafts) + 1):
                history = list(state.outputs) + drafts[:i] if state.needs_history else ()
                sampling_rows.append(SamplingRow(base.params, base.prompt_token_ids, history, base.generator,
                                                 num_outputs + i))
        # The logits are this step's scratch (the graph's output buffer or a fresh tensor).
        token_ids, logprobs = self.sampler.sample(logits, sampling_rows, logits_writable=True,
                                                  verify=draft_verifier(verified, sampling_rows) if verified else None)
        self.prev_sampled = token_ids
        if self.device.type != "cuda":
            return LaunchedStep(req_ids, drafts_per_row, token_ids, logprobs)
        host_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host_ids.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedStep(req_ids, drafts_per_row, token_ids, logprobs, host_ids, ready)
