"""LLMEngine: the engine loop — add requests, ``step()`` until done, abort.

One step = schedule → run the model on the scheduled tokens → sample → append tokens, detokenize, check
stop conditions → free finished sequences. The server's AsyncLLM drives the same loop from its own thread.

Async scheduling (CUDA): step N+1 is scheduled and queued on the GPU before the host reads step N's sampled
ids, so host work overlaps GPU work. A sampled token the host has not read is counted by its sequence's
``num_in_flight`` (never written into ``token_ids``); step N+1's inputs read it on the device from step N's
sampled ids, and the host appends the real id when it lands. A sequence that stops at step N still ran in step
N+1; that extra row is dropped. Steps whose sequences need penalties (which read the ids of the history) or may get
draft tokens (a proposal needs the ids) wait for the previous step first. Without async scheduling the same path
runs with each step landing in the call that launched it.

Verification rows: with a ``DraftProposer``, a decoding sequence may be scheduled with k draft tokens; the runner
returns the 1..k+1 tokens it accepts, and the engine rolls back the rest (``Scheduler.rollback``: computed-token
count, KV blocks; the prefix cache only ever hashes accepted tokens).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from tokenmill.attention.backend import get_attention_backend
from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.scheduler import DraftProposer, Scheduler, SchedulerOutput
from tokenmill.engine.sequence import Request, Sequence, SequenceStatus
from tokenmill.engine.threads import set_engine_threads
from tokenmill.model.loader import load_model
from tokenmill.outputs import RequestOutput
from tokenmill.runner.kv_sizing import num_kv_blocks
from tokenmill.runner.model_runner import LaunchedStep, ModelRunner
from tokenmill.runner.piecewise_graphs import PIECEWISE_MAX_TOKENS
from tokenmill.sampling.penalties import needs_penalties
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode.stats import SpecDecodeStats
from tokenmill.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


@dataclass
class InFlightStep:
    """A launched step whose sampled ids the host has not read yet."""

    sched: SchedulerOutput
    launched: LaunchedStep
    sampling: list[Sequence]  # sequences that sample this step (each has one token in flight)
    has_drafts: bool = False  # verification rows: their computed counts wait for the rollback on landing
    launched_at: float = 0.0  # time.monotonic() at launch: the speculation policy's measured step costs
    # Launched after the previous step landed (True: proposals were possible), or while it ran (False); None: no
    # step was in flight. The speculation gate compares the two modes' throughput (spec_decode/mode_gate.py).
    synchronous: bool | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1, blocks held by live sequences
    prefix_cache_queries: int  # prompt tokens looked up (cumulative)
    prefix_cache_hits: int  # prompt tokens served from cache (cumulative)
    num_preemptions: int
    num_steps: int
    prompt_tokens: int
    generation_tokens: int
    spec_decode: SpecDecodeStats | None = None  # speculative decoding's acceptance counters (None: off)

    # Flat views for the metrics snapshot (vLLM's spec_decode_* counters; 0 without speculation).
    @property
    def spec_decode_num_drafts(self) -> int:
        return self.spec_decode.num_drafts if self.spec_decode is not None else 0

    @property
    def spec_decode_num_draft_tokens(self) -> int:
        return self.spec_decode.num_draft_tokens if self.spec_decode is not None else 0

    @property
    def spec_decode_num_accepted_tokens(self) -> int:
        return self.spec_decode.num_accepted_tokens if self.spec_decode is not None else 0

    @property
    def spec_decode_accepted_per_pos(self) -> list[int]:
        return list(self.spec_decode.accepted_per_pos) if self.spec_decode is not None else []


class LLMEngine:
    def __init__(self, config: EngineConfig, load_progress: bool = False, stream_outputs: bool = True,
                 draft_proposer: DraftProposer | None = None) -> None:
        """``stream_outputs``: step() reports every request that progressed (servers stream them); when False
        it reports finished requests only and text is decoded once at the end unless stop strings need it
        per token (offline runs: no per-step output building or detokenizing). ``draft_proposer``: drafts to
        verify for decoding sequences (speculative decoding; None: plain decoding)."""
        self.config = config
        self.stream_outputs = stream_outputs
        # False: output text is decoded by the caller (the engine-core process's API side); only requests with
        # stop strings are decoded here, since stopping on them is the engine's job.
        self.detokenize_outputs = True
        # What step() returns per request that progressed; the engine-core process swaps in a builder of only
        # the new tokens (a full RequestOutput copies every token so far, per step).
        self.output_builder: Callable[[Request], Any] = Request.make_output
        mc = config.model
        self.attn_backend = get_attention_backend(config.runner.attention_backend, mc.device)
        executor = None
        if config.runner.tensor_parallel_size > 1:  # rank 0 lives here; the other ranks are worker processes
            from tokenmill.runner.tp_executor import TPExecutor

            executor = TPExecutor(config, self.attn_backend)
            loaded = executor.loaded
        else:
            loaded = load_model(mc, self.attn_backend, progress=load_progress)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids: set[int] = set(loaded.eos_token_ids)
        self.max_model_len: int = loaded.max_model_len
        self.model_name: str = loaded.name
        config.check_against_model(self.max_model_len)

        kv_spec = config.cache.kv_cache_spec(self.model.num_kv_heads, self.model.head_dim, mc.torch_dtype)
        self.runner = executor or ModelRunner(self.model, mc.device, mc.torch_dtype, kv_spec, self.eos_token_ids)
        sched_cfg = config.scheduler
        on_cuda = mc.device.startswith("cuda")
        if on_cuda:  # after loading (a checkpoint's CPU-side casts use the whole team): see engine/threads.py
            set_engine_threads(on_cpu=False)
        spec = config.speculative
        graphs = on_cuda and not config.runner.enforce_eager
        if draft_proposer is None and spec is not None:  # before KV sizing: a draft model takes memory too
            from tokenmill.spec_decode.decoder import build_speculative_decoder

            draft_proposer = build_speculative_decoder(spec, self, mc.device, pad_to_uniform=graphs)
        # An EAGLE proposer reads the target's hidden states of every step (set before graph capture: the graphs
        # then end at the hidden states).
        self.runner.feature_sink = getattr(draft_proposer, "feature_sink", None)
        if on_cuda and executor is None and config.runner.tune_gemm:
            from tokenmill.runner.linear_tuning import tune_linears

            # Before graph capture, which bakes the choice in; rows up to the largest decode batch.
            tune_linears(self.model, max_rows=sched_cfg.max_num_seqs)
        if on_cuda:  # measure peak activation memory before giving the rest to the KV cache
            num_sampled = sched_cfg.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))
            self.runner.profile_run(sched_cfg.max_num_batched_tokens, min(num_sampled, sched_cfg.max_num_batched_tokens),
                                    self.max_model_len)
        num_blocks = num_kv_blocks(config.cache, kv_spec, mc.device, self.model.num_layers, self.max_model_len,
                                   config.scheduler.max_num_seqs)
        self.runner.allocate_kv_cache(num_blocks)
        if graphs:  # verification rows of 1 + k tokens replay graphs too
            query_lens = tuple(range(1, spec.num_speculative_tokens + 2)) if spec is not None else (1,)
            self.runner.capture_graphs(min(sched_cfg.max_num_seqs, config.runner.max_graph_batch_size),
                                       self.max_model_len, query_lens)
            if config.runner.piecewise_graphs and executor is not None:
                logger.info("cudagraph_mode FULL_AND_PIECEWISE: not with tensor parallelism yet; steps with "
                            "prompts run eagerly")
            elif config.runner.piecewise_graphs:
                self.runner.capture_piecewise_graphs(min(sched_cfg.max_num_batched_tokens, PIECEWISE_MAX_TOKENS))
        if config.cache.calculate_kv_scales:  # after warm-up and capture, whose keys are dummies
            self.runner.kv_caches.arm_scale_calculation()
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.scheduler.max_model_len = self.max_model_len
        self.scheduler.draft_proposer = draft_proposer
        # A sampling draft model's distributions go to the runner's rejection sampler (rank 0 samples).
        self.runner.draft_probs = getattr(draft_proposer, "draft_probs", None)
        self.num_kv_cache_tokens = num_blocks * config.cache.block_size
        self.requests: dict[str, Request] = {}
        self.grammars = GrammarCompiler(self.tokenizer.hf if self.tokenizer is not None else None,
                                        self.model.vocab_size, self.eos_token_ids)
        self.async_scheduling = config.runner.schedules_async(on_cuda)
        self.in_flight: InFlightStep | None = None
        self._last_landing: float | None = None  # time.monotonic() of the last landed step (speculation gate)
        self.num_steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        logger.info(
            "engine ready: model=%s max_model_len=%d kv_cache=%d tokens (%d blocks of %d) device=%s dtype=%s",
            self.model_name, self.max_model_len, self.num_kv_cache_tokens, num_blocks,
            config.cache.block_size, mc.device, mc.torch_dtype,
        )

    @classmethod
    def from_kwargs(cls, load_progress: bool = False, stream_outputs: bool = True,
                    draft_proposer: DraftProposer | None = None, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs), load_progress=load_progress, stream_outputs=stream_outputs,
                   draft_proposer=draft_proposer)

    # ---- requests --------------------------------------------------------------------------------
    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (a sentence with the numbers) when a request can never run."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but max_model_len is {self.max_model_len}; "
                "the prompt must leave room for at least one generated token"
            )
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len ({self.max_model_len}); lower max_tokens or shorten the prompt"
            )
        vocab = self.model.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab}); the model's vocabulary has {vocab} tokens")
        total = n + (params.max_tokens or (self.max_model_len - n))
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise ValueError(
                f"this request needs up to {total} tokens of KV cache but the whole cache holds "
                f"{self.num_kv_cache_tokens}; raise --kv-cache-memory or lower max_tokens"
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        arrival_time: float | None = None,
        validated: bool = False,
    ) -> None:
        """``validated``: the caller has run ``validate_prompt`` on this prompt (a front end that answers bad
        requests before queueing them), so it is not checked twice."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not validated:
            self.validate_prompt(prompt_token_ids, params)
        request = Request(request_id, prompt, list(prompt_token_ids), params,
                          arrival_time=arrival_time if arrival_time is not None else time.monotonic())
        spec = params.structured_outputs  # compiled off this thread by AsyncLLM; a cache hit here
        leader: Sequence | None = None
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(
                seq_id=request_id if params.n == 1 else f"{request_id}#{index}",
                index=index,
                request=request,
                prompt_token_ids=request.prompt_token_ids,
                params=params,
                seed=seed,
                detokenizer=IncrementalDetokenizer(self.tokenizer.hf, request.prompt_token_ids, params)
                if self.tokenizer is not None and (self.detokenize_outputs or params.stop) else None,
                token_limit=min(len(prompt_token_ids) + params.max_tokens, self.max_model_len)
                if params.max_tokens is not None else self.max_model_len,
                leader=leader,
                logprobs=[] if params.logprobs is not None else None,
                grammar=self.grammars.matcher(spec) if spec is not None else None,
            )
            leader = leader or seq
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        self.prompt_tokens += len(prompt_token_ids)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for request_id in ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.sequences:
                if not seq.status.finished:
                    seq.status = SequenceStatus.FINISHED_ABORTED
                    self.scheduler.remove_finished(seq)

    def shutdown(self) -> None:
        """Stop worker processes (tensor parallelism); a single-process engine has nothing to stop."""
        self.runner.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage,
            prefix_cache_queries=self.block_manager.prefix_cache_queries,
            prefix_cache_hits=self.block_manager.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            spec_decode=self.spec_decode_stats,
        )

    @property
    def spec_decode_stats(self) -> SpecDecodeStats | None:
        """Acceptance counters of the built-in speculative decoder (None without one)."""
        stats = getattr(self.scheduler.draft_proposer, "stats", None)
        return stats if isinstance(stats, SpecDecodeStats) else None

    # ---- the loop --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns outputs of the requests that progressed (with async scheduling: of the
        previous step, whose ids land while this one runs)."""
        outputs: list[RequestOutput] = []
        synchronous = None
        if self.in_flight is not None:
            wants_ids = self._needs_history_ids()  # asked every step: a speculation gate counts them
            synchronous = self.in_flight.has_drafts or wants_ids
            if synchronous:
                outputs = self._land_in_flight()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.in_flight is not None:
                return outputs + self._land_in_flight()
            if self.scheduler.num_unfinished and not outputs:
                raise RuntimeError(
                    f"scheduler made no progress with {self.scheduler.num_unfinished} sequences pending "
                    f"and {self.block_manager.num_free_blocks}/{self.block_manager.num_blocks} free blocks"
                )
            return outputs
        now = time.monotonic()
        if sched.record.new_requests:  # a sequence's first schedule is the one that introduces it to the runner
            for item in sched.scheduled:
                metrics = item.seq.request.metrics
                if metrics.first_scheduled_time is None:
                    metrics.first_scheduled_time = now
        self.num_steps += 1
        # Synchronous scheduling is the same path with the step landing at once (in_flight is always None
        # here then, since every step lands in the call that launched it).
        # Matchers of the constrained rows this step samples: the sampler fills their masks (rank 0 only; the
        # record itself stays plain data).
        grammars = {}
        sampling = []
        has_drafts = False
        # One pass per row (this runs for every row of every step); the record's entry says whether it samples.
        for item, entry in zip(sched.scheduled, sched.record.scheduled, strict=True):
            seq = item.seq
            if entry.samples:
                seq.num_in_flight += 1
                sampling.append(seq)
                if seq.grammar is not None:
                    grammars[seq.seq_id] = seq.grammar
            if entry.draft_token_ids:
                has_drafts = True
            seq.num_computed_tokens += item.num_tokens
        # A constrained row's mask needs the token the previous step sampled for it: that step lands between
        # this step's forward pass (queued first, so the device stays busy) and its sampling, and the masks are
        # filled while the forward runs. Steps stay overlapped whether or not they constrain rows.
        landed: list[RequestOutput] = []
        overlapped = bool(grammars) and self.in_flight is not None
        land_first = (lambda: landed.extend(self._land_in_flight())) if overlapped else None
        launched = self.runner.launch(sched.record, grammars, land_first)
        if self.in_flight is not None:
            landed += self._land_in_flight()
        outputs += landed
        self.in_flight = InFlightStep(sched, launched, sampling, has_drafts, now, synchronous)
        if not self.async_scheduling:
            outputs += self._land_in_flight()
        return outputs

    def _needs_history_ids(self) -> bool:
        # Penalties read the history's ids on the device side of the next step, so they must be real; so do
        # proposers, and a verification row's next input depends on how many drafts were accepted.
        proposer = self.scheduler.draft_proposer
        if proposer is not None:  # an adaptive proposer that will not speculate at this batch size keeps overlap
            active = getattr(proposer, "active", None)
            if active is None or active(len(self.scheduler.running), self.scheduler.has_prompt_work):
                return True
        return any(needs_penalties(seq.params) for seq in self.scheduler.running)

    def _observe_cycle(self, step: InFlightStep, num_step_tokens: int, num_drafts: int, gained: int,
                       now: float) -> None:
        """Tell a speculation gate what a decode-only step gained (``gained`` ids) and how long since the previous
        landing. Counts only, no walk over the rows: at batch 256 this runs on the host's critical path."""
        previous, self._last_landing = self._last_landing, now
        observe_cycle = getattr(self.scheduler.draft_proposer, "observe_cycle", None)
        if observe_cycle is None or step.synchronous is None or previous is None:
            return
        # Decode-only: every row samples and computes 1 + its drafts (a sampling row computes at least that many,
        # so the totals agree only when each row does).
        rows = len(step.sched.scheduled)
        if len(step.sampling) != rows or num_step_tokens != rows + num_drafts:
            return  # prompt tokens in the step: not a comparison of decoding modes
        observe_cycle(rows, step.synchronous, gained, now - previous)

    def _land_in_flight(self) -> list[RequestOutput]:
        """Wait for the in-flight step's ids, append them, roll back rejected drafts, check stop conditions, free
        finished sequences, register full blocks (of accepted tokens) in the prefix cache."""
        step, self.in_flight = self.in_flight, None
        assert step is not None
        result = step.launched.result()
        now = time.monotonic()
        touched: dict[str, Request] = {}
        drafts = {item.seq.seq_id: len(item.draft_token_ids) for item in step.sched.scheduled
                  if item.draft_token_ids} if self.scheduler.draft_proposer is not None else {}
        observe = getattr(self.scheduler.draft_proposer, "observe", None)
        observe_step = getattr(self.scheduler.draft_proposer, "observe_step", None)
        num_step_tokens = step.sched.num_tokens if self.scheduler.draft_proposer is not None else 0
        if observe_step is not None:  # launch to landing: what a step of this many tokens costs (no extra sync)
            observe_step(num_step_tokens, now - step.launched_at)
        gained = 0
        for seq in step.sampling:
            if seq.status.finished:  # stopped at the step before (or aborted): this row was surplus
                continue
            seq.num_in_flight -= 1
            token_ids = result.token_ids[seq.seq_id]
            gained += len(token_ids)
            num_drafts = drafts.get(seq.seq_id, 0)
            if num_drafts and observe is not None:  # acceptance statistics and the adaptive policy
                observe(seq.seq_id, num_drafts, len(token_ids) - 1)
            if num_drafts:  # k drafts computed k + 1 tokens' KV; only the tokens before the last one gained are kept
                self.scheduler.rollback(seq, num_drafts + 1 - len(token_ids))
            for token_id, logprobs in zip(token_ids, result.logprobs[seq.seq_id], strict=True):
                seq.token_ids.append(token_id)
                self._record_token(seq, token_id, logprobs, now, touched)
                if seq.status.finished:
                    break
        self._observe_cycle(step, num_step_tokens, sum(drafts.values()), gained, now)
        self.block_manager.cache_full_blocks_of(item.seq for item in step.sched.scheduled
                                                if not item.seq.status.finished)
        return self._collect_outputs(touched, now)

    def _collect_outputs(self, touched: dict[str, Request], now: float) -> list[RequestOutput]:
        outputs = []
        for request in touched.values():
            finished = request.finished
            if finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
            if self.stream_outputs or finished:
                outputs.append(self.output_builder(request))
        return outputs

    def _record_token(self, seq: Sequence, token_id: int, logprobs, now: float, touched: dict[str, Request]) -> None:
        """A sampled id is in place in ``seq.token_ids``: bookkeeping, detokenizing, stop conditions."""
        request = seq.request
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        self.generation_tokens += 1
        if seq.logprobs is not None and logprobs is not None:
            seq.logprobs.append(logprobs)
        params = seq.params
        num_tokens = len(seq.token_ids)
        num_out = num_tokens - seq.prompt_len
        past_min = num_out >= params.min_tokens
        stop_string = (seq.detokenize_pending() if seq.detokenizer is not None and (self.stream_outputs or params.stop)
                       else None)
        grammar_ended = seq.grammar is not None and seq.grammar.advance(token_id)
        status: SequenceStatus | None = None
        if past_min and not params.ignore_eos and token_id in self.eos_token_ids:
            status = SequenceStatus.FINISHED_STOPPED
        elif past_min and token_id in params.stop_token_ids:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token_id
        elif past_min and stop_string is not None:
            status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop_string
        elif grammar_ended:  # its stop token accepted (ignore_eos cannot outlive the grammar)
            status = SequenceStatus.FINISHED_STOPPED
        elif num_tokens >= seq.token_limit:  # max_tokens reached, or max_model_len
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            seq.num_in_flight = 0  # a token of a step launched after this one: surplus
            seq.status = status
            self.scheduler.remove_finished(seq)
        if status is not None or self.stream_outputs:  # without streaming only a finished request has an output
            touched[request.request_id] = request
