"""ModelRunner: executes one SchedulerOutput — builds tensors, runs the model, samples the next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tokenmill.attention.backend import allocate_kv_cache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.outputs import Logprob
from tokenmill.runner.cuda_graphs import DecodeGraphs
from tokenmill.runner.inputs import build_model_inputs
from tokenmill.sampling.sampler import Sampler, SamplingRow

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    # Parallel lists over the scheduled entries that sampled this step.
    rows: list[int]
    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: str, dtype: torch.dtype, block_size: int,
                 eos_token_ids: set[int]) -> None:
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Softmax tails underflow into denormal floats, which x86 handles ~100x slower (a SmolLM2 decode
            # step measured 3.0 s with them, 0.17 s without). Flushing them to zero changes no result that
            # fp32 can represent next to the normal values they are summed with.
            torch.set_flush_denormal(True)
        self.dtype = dtype
        self.block_size = block_size
        self.sampler = Sampler(eos_token_ids)
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None

    def shutdown(self) -> None:
        """In-process runner: nothing to stop (the tensor-parallel executor stops its workers here)."""

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_cache(
            self.model.num_layers, num_blocks, self.block_size, self.model.num_kv_heads, self.model.head_dim,
            self.dtype, self.device,
        )

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_sampled: int) -> None:
        """One forward at the largest step size on a throwaway cache, so peak activation memory is measured."""
        num_blocks = -(-num_tokens // self.block_size)
        caches = allocate_kv_cache(self.model.num_layers, num_blocks, self.block_size, self.model.num_kv_heads,
                                   self.model.head_dim, self.dtype, self.device)
        meta = AttentionMetadata.build([num_tokens], [num_tokens], [list(range(num_blocks))], self.block_size,
                                       self.device)
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.arange(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, positions, caches, meta)
        self.model.compute_logits(hidden[-1:].expand(num_sampled, -1))
        del caches, hidden
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def capture_graphs(self, max_batch: int, max_model_len: int) -> None:
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_batch, max_blocks, self.device)
        self.graphs.capture()

    @torch.inference_mode()
    def forward_logits(self, sched: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Logits [num_sampling_seqs, vocab] (float32) and which scheduled rows they belong to."""
        inputs = build_model_inputs(sched, self.block_size, self.device)
        if self.graphs is not None and self.graphs.can_run(inputs.meta):
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        logits = self.model.compute_logits(hidden.index_select(0, inputs.sample_indices))
        return logits.float(), inputs.sample_rows

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        logits, rows = self.forward_logits(sched)
        if not rows:
            return StepResult([], [], [])
        sampling_rows = []
        for row in rows:
            seq = sched.scheduled[row].seq
            sampling_rows.append(SamplingRow(seq.params, seq.prompt_token_ids, seq.output_token_ids, seq.generator))
        out = self.sampler(logits, sampling_rows)
        return StepResult(rows, out.token_ids, out.logprobs)
