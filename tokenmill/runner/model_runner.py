"""ModelRunner: executes one SchedulerOutput — builds tensors, runs the model, samples the next tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.config import KVCacheSpec
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.outputs import Logprob
from tokenmill.runner.cuda_graphs import DecodeGraphs
from tokenmill.runner.inputs import ModelInputs, build_model_inputs
from tokenmill.sampling.penalties import needs_penalties
from tokenmill.sampling.sampler import Sampler, SamplingRow
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    # Parallel lists over the scheduled entries that sampled this step.
    rows: list[int]
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


@dataclass
class LaunchedStep:
    """A step whose GPU work is queued: sampled ids live on the device until ``result()`` reads them."""

    rows: list[int]  # scheduled entries that sample, in the order of token_ids
    token_ids: torch.Tensor  # [len(rows)] int64 on the model's device
    logprobs: list[dict[int, Logprob] | None]
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
        return StepResult(self.rows, ids, self.logprobs)

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
                 eos_token_ids: set[int]) -> None:
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

    def shutdown(self) -> None:
        """In-process runner: nothing to stop (the tensor-parallel executor stops its workers here)."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = KVCache(self.kv_spec, self.model.num_layers, num_blocks, self.device)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_sampled: int) -> None:
        """One forward at the largest step size on a throwaway cache, so peak activation memory is measured."""
        num_blocks = self.kv_spec.blocks_for_tokens(num_tokens)
        caches = KVCache(self.kv_spec, self.model.num_layers, num_blocks, self.device)
        meta = self.attn_backend.build_metadata([num_tokens], [num_tokens], [list(range(num_blocks))],
                                                self.block_size, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, dtype=torch.int64, device=self.device)
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

    def capture_graphs(self, max_batch: int, max_model_len: int) -> None:
        max_blocks = self.kv_spec.blocks_for_tokens(max_model_len)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_batch, max_blocks, self.device)
        self.graphs.capture()

    @torch.inference_mode()
    def forward_logits(
        self, sched: SchedulerOutput, prev_token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Logits [num_sampling_seqs, vocab] (model dtype) and which scheduled rows they belong to.

        ``prev_token_ids``: the in-flight step's sampled ids, which placeholder input ids point into.
        """
        inputs = build_model_inputs(sched, self.block_size, self.device, prev_token_ids, backend=self.attn_backend)
        return self.run_model(inputs), inputs.sample_rows

    def run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """Logits of the sampling rows: a captured graph for decode batches it covers, else eager."""
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            # The graph computed every token's logits (row-major by sequence); keep the sampled ones.
            logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta, inputs.placeholder_ids)
            if logits.shape[0] != inputs.sample_indices.shape[0]:  # e.g. a 1-token chunk mid-prompt
                logits = logits.index_select(0, inputs.sample_indices)
            return logits
        hidden = self.model(inputs.resolved_ids(), inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden.index_select(0, inputs.sample_indices))

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, prev_token_ids: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the step's forward pass and sampling; the host waits only in ``LaunchedStep.result()``."""
        logits, rows = self.forward_logits(sched, prev_token_ids)
        if not rows:
            return LaunchedStep([], torch.zeros(0, dtype=torch.int64, device=self.device), [])
        sampling_rows = []
        for row in rows:
            seq = sched.scheduled[row].seq
            # Only penalties read the history's ids; copying every history on every step costs O(length).
            history = seq.output_token_ids if needs_penalties(seq.params) else ()
            sampling_rows.append(
                SamplingRow(seq.params, seq.prompt_token_ids, history, seq.generator, seq.num_output_tokens)
            )
        # The logits are this step's scratch (the graph's output buffer or a fresh tensor).
        token_ids, logprobs = self.sampler.sample(logits, sampling_rows, logits_writable=True)
        if self.device.type != "cuda":
            return LaunchedStep(rows, token_ids, logprobs)
        host_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host_ids.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return LaunchedStep(rows, token_ids, logprobs, host_ids, ready)
