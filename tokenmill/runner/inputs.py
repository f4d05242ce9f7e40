"""Turn a SchedulerOutput into the flat tensors one forward pass needs (token ids, positions, metadata)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.engine.scheduler import SchedulerOutput


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] flat index of each sampling sequence's last token
    sample_rows: list[int]  # which scheduled entries sample this step, in order


def build_model_inputs(sched: SchedulerOutput, block_size: int, device: torch.device | str) -> ModelInputs:
    token_ids: list[int] = []
    positions: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    sample_indices: list[int] = []
    sample_rows: list[int] = []
    for row, item in enumerate(sched.scheduled):
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_tokens
        token_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        query_lens.append(item.num_tokens)
        seq_lens.append(end)
        tables.append(seq.block_table)
        if item.samples:
            sample_indices.append(len(token_ids) - 1)
            sample_rows.append(row)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device)
    return ModelInputs(
        input_ids=torch.tensor(token_ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        meta=meta,
        sample_indices=torch.tensor(sample_indices, dtype=torch.int64, device=device),
        sample_rows=sample_rows,
    )
