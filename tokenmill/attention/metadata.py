"""AttentionMetadata: where one engine step's tokens sit in the flat batch and in the paged KV cache.

Tokens of all scheduled sequences are packed along one axis (no padding). Sequence i owns query tokens
``query_start_loc[i]:query_start_loc[i+1]``; its keys live in the blocks ``block_tables[i]`` and it has
``seq_lens[i]`` tokens in total after this step (cached context + new tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]

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
        """Build from per-sequence lists (the runner's job; also handy in tests)."""
        starts = [0]
        slots: list[int] = []
        for qlen, slen, table in zip(query_lens, seq_lens, block_tables, strict=True):
            starts.append(starts[-1] + qlen)
            for pos in range(slen - qlen, slen):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max([len(t) for t in block_tables] + [pad_blocks_to or 1])
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
            is_decode_only=all(q == 1 for q in query_lens),
        )
