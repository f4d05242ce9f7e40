"""CUDA graphs for decode: one captured forward per (query length, batch size), replayed with padded inputs.

Decode steps are launch-bound at small batch sizes (hundreds of small kernels per step); a graph replays
them with one launch. The graph ends with the logits (model dtype) of every token (lm_head included), since in a
decode step (nearly) every row samples. Query length 1 is plain decode; 1 + k serves verification rows of k
draft tokens. Graphs read fixed buffers: the token ids and positions here, the attention metadata in buffers
the attention backend owns (``AttentionBackend.graph_buffers``: capture/replay hooks), so this file never
reads a metadata field. One-token steps copy everything in one kernel (kernels/stage_inputs.py) that fills the
backend's named buffers; padding rows get slot -1 (the KV write skips them) and sequence length 0 (attention
writes zeros).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from tokenmill.attention.graph_buffers import DecodeGraphBuffers
from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import MAX_DECODE_QUERY_LEN, AttentionMetadata
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.stage_inputs import (
    GraphInputs,
    InFlightIds,
    resolve_in_flight,
    stage_decode_inputs,
    stage_decode_inputs_reference,
)

logger = logging.getLogger(__name__)

# Graphs of more tokens than this end at the hidden states and the LM head runs after the replay. Each captured
# size keeps its own output buffer alive in the pool: [tokens, vocab] logits per size up to 256 rows are 0.56 GB at
# Llama-3's 128k vocabulary, up to 1024 rows (max_num_seqs 1024) 8.5 GB, taken from the headroom the KV sizing
# left (graphs are captured after it). One extra launch per step is nothing at that batch.
MAX_GRAPH_LOGIT_ROWS = 256


def batch_size_ladder(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to ``max_batch`` (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    """``query_lens``: new tokens per sequence to capture graphs for (1 = plain decode; 1 + k for k drafts)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: KVCache | list[torch.Tensor],
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        device: torch.device,
        query_lens: Sequence[int] = (1,),
        eager_logits_from: int = MAX_DECODE_QUERY_LEN + 1,
        max_logit_rows: int = MAX_GRAPH_LOGIT_ROWS,
    ) -> None:
        """``eager_logits_from``: graphs of this query length and longer end at the hidden states and the LM head
        runs after the replay: every token of a verification row needs logits, and a captured [tokens, vocab]
        output per (query length, batch size) would hold gigabytes (128k vocabulary) that nothing else can use.
        So do graphs of more than ``max_logit_rows`` tokens."""
        if not query_lens or any(not 1 <= q <= MAX_DECODE_QUERY_LEN for q in query_lens):
            raise ValueError(f"graph query lengths must be 1..{MAX_DECODE_QUERY_LEN}; got {list(query_lens)}")
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = self.sizes[-1]
        self.max_blocks = max_blocks_per_seq
        self.query_lens = sorted(set(query_lens))
        self.eager_logits_from = eager_logits_from
        self.max_logit_rows = max_logit_rows
        backend = model.attn_backend
        n = self.max_batch
        self.buffers: dict[int, DecodeGraphBuffers] = {}
        self.input_ids: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor] = {}
        for q in self.query_lens:
            self.buffers[q] = backend.graph_buffers(n, max_blocks_per_seq, block_size, q, device)
            self.input_ids[q] = torch.zeros(n * q, dtype=torch.int64, device=device)
            self.positions[q] = torch.zeros(n * q, dtype=torch.int64, device=device)
        self.inputs: GraphInputs | None = None  # what the one-token staging kernel writes
        if 1 in self.buffers and self.buffers[1].KERNEL_STAGED:
            self.inputs = GraphInputs(input_ids=self.input_ids[1], positions=self.positions[1],
                                      **self.buffers[1].kernel_staged())
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (query_len, batch size) -> graph
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    def logits_in_graph(self, q: int, size: int) -> bool:
        """Whether the (query length, batch size) graph ends at the logits (else at the hidden states)."""
        return q < self.eager_logits_from and size * q <= self.max_logit_rows

    def _forward(self, q: int, size: int) -> torch.Tensor:
        tokens = size * q
        meta = self.buffers[q].prepare_for_capture(size)
        hidden = self.model(self.input_ids[q][:tokens], self.positions[q][:tokens], self.kv_caches, meta)
        return self.model.compute_logits(hidden) if self.logits_in_graph(q, size) else hidden

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first (most tokens): later graphs reuse its pool memory.
        for q in reversed(self.query_lens):
            for size in reversed(self.sizes):
                self._forward(q, size)  # compile Triton kernels and warm the allocator outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[q, size] = self._forward(q, size)
                self.graphs[q, size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for query lengths %s x batch sizes %s", self.query_lens, self.sizes)

    def can_run(self, meta: AttentionMetadata) -> bool:
        buffers = self.buffers.get(meta.decode_query_len)
        return buffers is not None and buffers.can_serve(meta)

    def graph(self, batch: int, query_len: int = 1) -> torch.cuda.CUDAGraph:
        """The graph a batch of ``batch`` sequences replays (benchmarks time it directly)."""
        return self.graphs[query_len, next(s for s in self.sizes if s >= batch)]

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        in_flight: InFlightIds | None = None,
    ) -> torch.Tensor:
        """Logits [num_tokens, vocab] of every token (a view into the graph's output buffer, or the LM head's output
        after the replay for graphs past ``max_logit_rows``).

        ``in_flight``: rows whose token the previous step sampled and the host has not read (staging reads it).
        """
        out, ends_at_logits = self._replay(input_ids, positions, meta, in_flight)
        return out if ends_at_logits else self.model.compute_logits(out)

    def run_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                   in_flight: InFlightIds | None = None) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of every token (a view into the graph's output buffer); only for
        graphs that end there (``eager_logits_from`` 1 captures no other kind)."""
        out, ends_at_logits = self._replay(input_ids, positions, meta, in_flight)
        if ends_at_logits:
            raise RuntimeError("this decode graph ends at the logits; capture with eager_logits_from=1 for hidden "
                               "states")
        return out

    def _replay(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                in_flight: InFlightIds | None) -> tuple[torch.Tensor, bool]:
        """Stage the inputs, replay the graph; (its output rows, whether they are logits)."""
        q, batch = meta.decode_query_len, meta.num_seqs  # the shape: which graph, how much padding
        size = next(s for s in self.sizes if s >= batch)
        if q == 1 and self.inputs is not None:  # one fused kernel stages ids, positions and the metadata
            stage = stage_decode_inputs if HAS_TRITON and input_ids.is_cuda else stage_decode_inputs_reference
            stage(self.inputs, input_ids, positions, size=size, in_flight=in_flight,
                  **self.buffers[1].kernel_sources(meta))
        else:
            tokens = batch * q
            self.input_ids[q][:tokens].copy_(resolve_in_flight(input_ids, in_flight))
            self.positions[q][:tokens].copy_(positions)
            self.buffers[q].prepare_for_replay(meta, size)
        self.graphs[q, size].replay()
        return self.outputs[q, size][: batch * q], self.logits_in_graph(q, size)
