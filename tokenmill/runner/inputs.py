"""Turn a SchedulerOutput into the flat tensors one forward pass needs (token ids, positions, metadata).

Two halves: ``host_step`` builds host arrays (what tensor-parallel ranks receive), ``upload_step`` moves them.

All of a step's arrays (int64 and int32) travel in one host-to-device copy (no stream syncs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.metadata import AttentionMetadata, HostLayout
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.kernels.stage_inputs import resolve_placeholders
from tokenmill.transfer import upload_arrays


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64; negative ids are placeholders into placeholder_ids
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] flat index of each sampling sequence's last token
    sample_rows: list[int]  # which scheduled entries sample this step, in order
    # The in-flight step's sampled ids when input_ids holds placeholders, else None. Swapped in where the ids
    # are used: by the decode graphs' staging kernel, or by ``resolved_ids`` on the eager path.
    placeholder_ids: torch.Tensor | None = None

    def resolved_ids(self) -> torch.Tensor:
        """input_ids with each placeholder -(j + 1) replaced by ``placeholder_ids[j]``."""
        return resolve_placeholders(self.input_ids, self.placeholder_ids)


@dataclass
class HostStep:
    """A step's inputs as host arrays: small, picklable, and the same on every tensor-parallel rank."""

    token_ids: np.ndarray  # [num_tokens] int64; negative ids are placeholders (see upload_step)
    layout: HostLayout
    sample_indices: np.ndarray  # [num_sampled] int64
    sample_rows: list[int]


def host_step(sched: SchedulerOutput, block_size: int) -> HostStep:
    """Flatten the scheduled entries into host arrays (no device work)."""
    token_ids: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    sample_indices: list[int] = []
    sample_rows: list[int] = []
    for row, item in enumerate(sched.scheduled):
        seq, num = item.seq, item.num_tokens
        start = seq.num_computed_tokens
        end = start + num
        if num == 1:
            token_ids.append(seq.token_ids[start])
        else:
            token_ids.extend(seq.token_ids[start:end])
        query_lens.append(num)
        seq_lens.append(end)
        tables.append(seq.block_table)
        if end == seq.num_tokens:  # reaches the last known token: its logits give the next one
            sample_indices.append(len(token_ids) - 1)
            sample_rows.append(row)
    return HostStep(np.asarray(token_ids, dtype=np.int64), HostLayout.build(query_lens, seq_lens, tables, block_size),
                    np.asarray(sample_indices, dtype=np.int64), sample_rows)


def upload_step(
    host: HostStep, device: torch.device | str, prev_token_ids: torch.Tensor | None = None, *,
    backend: AttentionBackend,
) -> ModelInputs:
    """``prev_token_ids``: sampled ids of the step still in flight. A negative input id -(j + 1) is a
    placeholder for its entry j (the host has not read it yet); it is filled in on the device. The attention
    ``backend`` names the layout arrays it needs and builds its metadata from them (one upload for all)."""
    layout = host.layout
    has_placeholders = bool(host.token_ids.size) and host.token_ids.min() < 0
    if has_placeholders and prev_token_ids is None:
        raise RuntimeError("placeholder input ids need the in-flight step's sampled ids")
    ids, positions, samples, *attn = upload_arrays(
        [host.token_ids, layout.positions, host.sample_indices, *backend.metadata_arrays(layout)], device
    )
    return ModelInputs(
        input_ids=ids,
        positions=positions,
        meta=backend.prepare_metadata(layout, attn),
        sample_indices=samples,
        sample_rows=host.sample_rows,
        placeholder_ids=prev_token_ids if has_placeholders else None,
    )


def build_model_inputs(
    sched: SchedulerOutput, block_size: int, device: torch.device | str, prev_token_ids: torch.Tensor | None = None,
    *, backend: AttentionBackend,
) -> ModelInputs:
    return upload_step(host_step(sched, block_size), device, prev_token_ids, backend=backend)
