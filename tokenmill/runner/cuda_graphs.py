"""CUDA graphs for decode: one captured forward per batch size on a ladder, replayed with padded inputs.

Decode steps are launch-bound at small batch sizes (hundreds of small kernels per step); a graph replays
them with one launch. The graph ends with the logits (model dtype) of every row (lm_head included), since in a
decode step (nearly) every row samples. Graphs read fixed buffers, so each step copies its inputs into them (one
kernel, kernels/stage_inputs.py); padding rows get slot -1 (the KV write skips them) and sequence length 0 (attention
writes zeros).
"""

from __future__ import annotations

import logging

import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.stage_inputs import (
    GraphInputs,
    InFlightIds,
    stage_decode_inputs,
    stage_decode_inputs_reference,
)

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to ``max_batch`` (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        n = self.max_batch
        self.inputs = GraphInputs(  # what each step's staging writes and every graph reads
            input_ids=torch.zeros(n, dtype=torch.int64, device=device),
            positions=torch.zeros(n, dtype=torch.int64, device=device),
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(n, dtype=torch.int32, device=device),
            block_tables=torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device),
        )
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.inputs.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.inputs.seq_lens[:size],
            block_tables=self.inputs.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_blocks * self.block_size,
            query_start_loc_cpu=list(range(size + 1)),
            seq_lens_cpu=[0] * size,  # unused on the decode path, which reads the device tensor
            is_decode_only=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.inputs.input_ids[:size], self.inputs.positions[:size], self.kv_caches, self._meta(size))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: later graphs reuse its pool memory
            self._forward(size)  # compile Triton kernels and warm the allocator outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            meta.is_decode_only
            and meta.num_seqs <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        in_flight: InFlightIds | None = None,
    ) -> torch.Tensor:
        """Logits [batch, vocab] of every row (a view into the graph's output buffer).

        ``in_flight``: rows whose token the previous step sampled and the host has not read (staging reads it).
        """
        batch = meta.num_seqs
        size = next(s for s in self.sizes if s >= batch)
        stage = stage_decode_inputs if HAS_TRITON else stage_decode_inputs_reference
        stage(self.inputs, input_ids, positions, meta.slot_mapping, meta.seq_lens, meta.block_tables, size,
              in_flight)
        self.graphs[size].replay()
        return self.outputs[size][:batch]
