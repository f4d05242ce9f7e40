"""AttentionMetadata: where one engine step's tokens sit in the flat batch and in the paged KV cache.

Tokens of all scheduled sequences are packed along one axis (no padding). Sequence i owns query tokens
``query_start_loc[i]:query_start_loc[i+1]``; its keys live in the blocks ``block_tables[i]`` and it has
``seq_lens[i]`` tokens in total after this step (cached context + new tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from tokenmill.transfer import upload_arrays

# Query tokens per sequence the decode path takes (1 + up to 7 draft tokens of a verification row); longer
# uniform steps go to the prefill path.
MAX_DECODE_QUERY_LEN = 8


def uniform_query_len(query_lens: np.ndarray) -> int:
    """The query length every sequence shares when it is 1..MAX_DECODE_QUERY_LEN (a decode-shaped step), else 0."""
    if not len(query_lens):
        return 0
    first = int(query_lens[0])
    if not 1 <= first <= MAX_DECODE_QUERY_LEN or not (query_lens == first).all():
        return 0
    return first


@dataclass
class HostLayout:
    """The step's token layout as host arrays, before upload (the runner adds its own arrays to the copy)."""

    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [N + 1] int32
    seq_lens: np.ndarray  # [N] int32
    block_tables: np.ndarray  # [N, width] int32, padded with 0
    max_query_len: int
    is_decode_only: bool
    decode_query_len: int  # see AttentionMetadata

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        pad_blocks_to: int | None = None,
    ) -> HostLayout:
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables need one entry per sequence")
        qlens = np.asarray(query_lens, dtype=np.int64)
        slens = np.asarray(seq_lens, dtype=np.int64)
        num_seqs = len(qlens)
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(qlens, out=starts[1:])
        lengths = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)
        width = max(int(lengths.max()) if num_seqs else 0, pad_blocks_to or 1)
        tables = np.zeros((num_seqs, width), dtype=np.int32)
        # One scatter of all tables' ids (row-major, as the mask's True entries are) instead of a row copy each.
        flat = np.fromiter(chain.from_iterable(block_tables), dtype=np.int32, count=int(lengths.sum()))
        tables[np.arange(width) < lengths[:, None]] = flat
        # Token t of sequence i sits at position (seq_len - query_len) + (t - start_i).
        owner = np.repeat(np.arange(num_seqs), qlens)
        positions = np.arange(int(starts[-1]), dtype=np.int64) - starts[owner] + (slens - qlens)[owner]
        slots = tables[owner, positions // block_size].astype(np.int64) * block_size + positions % block_size
        return cls(
            positions=positions,
            slot_mapping=slots,
            query_start_loc=starts.astype(np.int32),
            seq_lens=slens.astype(np.int32),
            block_tables=tables,
            max_query_len=int(qlens.max()) if num_seqs else 0,
            is_decode_only=bool((qlens == 1).all()),
            decode_query_len=uniform_query_len(qlens),
        )


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block_id * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context + new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies so reference code and planners need no device sync.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Decode-only steps (every query length 1) let fast backends take the paged-decode kernel.
    is_decode_only: bool = False
    # Every sequence has this many query tokens (1 + k draft tokens), 1..MAX_DECODE_QUERY_LEN: the decode
    # kernel (causal among the new tokens) and the (batch, 1 + k) CUDA graphs serve it. 0: a mixed step.
    decode_query_len: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]

    @classmethod
    def from_layout(
        cls, layout: HostLayout, slot_mapping: torch.Tensor, int32_tensors: Sequence[torch.Tensor]
    ) -> AttentionMetadata:
        """Wrap uploaded tensors: ``int32_tensors`` = (query_start_loc, seq_lens, block_tables)."""
        query_start_loc, seq_lens, block_tables = int32_tensors
        seq_lens_cpu = layout.seq_lens.tolist()
        return cls(
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            max_query_len=layout.max_query_len,
            max_seq_len=max(seq_lens_cpu, default=0),
            query_start_loc_cpu=layout.query_start_loc.tolist(),
            seq_lens_cpu=seq_lens_cpu,
            is_decode_only=layout.is_decode_only,
            decode_query_len=layout.decode_query_len,
        )

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        pad_blocks_to: int | None = None,
    ) -> AttentionMetadata:
        """Build from per-sequence lists (profiling runs and tests; the runner uploads its ids with these)."""
        layout = HostLayout.build(query_lens, seq_lens, block_tables, block_size, pad_blocks_to)
        (slots,) = upload_arrays([layout.slot_mapping], device)
        int32 = upload_arrays([layout.query_start_loc, layout.seq_lens, layout.block_tables], device)
        return cls.from_layout(layout, slots, int32)
