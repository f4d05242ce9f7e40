"""A backend's fixed metadata buffers for decode CUDA graphs, and its capture/replay hooks.

A captured graph reads its attention metadata from fixed addresses. The backend owns those buffers: the
runner's graph code (runner/cuda_graphs.py) asks for metadata to capture with (``prepare_for_capture``) and,
before each replay, hands the step's metadata over to be copied in (``prepare_for_replay``); it never reads
a field. Padding rows get slot -1 (the KV write skips them) and sequence length 0 (attention writes zeros).
"""

from __future__ import annotations

import torch

from tokenmill.attention.metadata import AttentionMetadata


class DecodeGraphBuffers:
    """Metadata buffers for graphs of ``query_len`` tokens per sequence (1, or 1 + k draft tokens)."""

    # Buffers the fused staging kernel (kernels/stage_inputs.py) fills by name on the one-token path; a backend
    # whose buffers differ sets this to () and stages everything in ``prepare_for_replay``.
    KERNEL_STAGED = ("slot_mapping", "seq_lens", "block_tables")

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, query_len: int,
                 device: torch.device | str) -> None:
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.query_len = query_len
        n = max_batch
        self.slot_mapping = torch.full((n * query_len,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(0, (n + 1) * query_len, query_len, dtype=torch.int32, device=device)

    def kernel_staged(self) -> dict[str, torch.Tensor]:
        """The buffers the staging kernel writes, by name."""
        return {name: getattr(self, name) for name in self.KERNEL_STAGED}

    def kernel_sources(self, meta: AttentionMetadata) -> dict[str, torch.Tensor]:
        """The step's tensors the staging kernel copies into ``kernel_staged()``, by the same names."""
        return {name: getattr(meta, name) for name in self.KERNEL_STAGED}

    def can_serve(self, meta: AttentionMetadata) -> bool:
        return (
            meta.decode_query_len == self.query_len
            and meta.num_seqs <= self.max_batch
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def prepare_for_capture(self, size: int) -> AttentionMetadata:
        """Metadata over the buffers' first ``size`` sequences (what the captured forward reads)."""
        q = self.query_len
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: size * q],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=q,
            max_seq_len=self.max_blocks * self.block_size,
            query_start_loc_cpu=list(range(0, (size + 1) * q, q)),
            seq_lens_cpu=[0] * size,  # unused on the decode path, which reads the device tensor
            is_decode_only=q == 1,
            decode_query_len=q,
        )

    def prepare_for_replay(self, meta: AttentionMetadata, size: int) -> None:
        """Copy the step's metadata into the buffers and pad sequences ``[batch, size)`` (torch ops; the
        one-token path uses the fused staging kernel on ``kernel_staged()`` instead)."""
        batch, width = meta.block_tables.shape
        tokens = batch * self.query_len
        self.slot_mapping[:tokens].copy_(meta.slot_mapping)
        self.slot_mapping[tokens : size * self.query_len].fill_(-1)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.seq_lens[batch:size].fill_(0)
        self.block_tables[:batch, :width].copy_(meta.block_tables)
