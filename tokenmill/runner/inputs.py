"""Turn a step record into the flat tensors one forward pass needs (token ids, positions, attention metadata).

Two halves: ``step_arrays`` builds host arrays from the record and the persistent batch (the same on every
tensor-parallel rank), ``upload_step`` moves them: all of a step's arrays (int64 and int32) travel in one
host-to-device copy (no stream syncs). ``attention_layout`` is the one place that shapes attention metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.metadata import AttentionMetadata, HostLayout
from tokenmill.engine.step_record import StepRecord
from tokenmill.kernels.stage_inputs import InFlightIds, resolve_in_flight
from tokenmill.runner.input_batch import InputBatch
from tokenmill.transfer import upload_arrays


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64; entries read from ``in_flight`` hold 0 until resolved
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampled] flat index of each token whose logits are sampled
    sample_rows: list[int]  # which scheduled entries sample this step, in order
    # Tokens the previous step sampled and the host has not read. Swapped in where the ids are used: by the
    # decode graphs' staging kernel, or by ``resolved_ids`` on the eager path.
    in_flight: InFlightIds | None = None

    def resolved_ids(self) -> torch.Tensor:
        return resolve_in_flight(self.input_ids, self.in_flight)


@dataclass
class StepArrays:
    """A step's inputs as host arrays, before upload."""

    token_ids: np.ndarray  # [num_tokens] int64
    in_flight_index: np.ndarray | None  # [num_tokens] int64: entry of the previous step's sampled ids, or -1
    layout: HostLayout
    sample_indices: np.ndarray  # [num_sampled] int64 (a verification row with k drafts samples k + 1 tokens)
    sample_rows: list[int]


def attention_layout(query_lens: list[int], seq_lens: list[int], tables: list[list[int]],
                     block_size: int) -> HostLayout:
    """Where the step's tokens sit in the batch and the paged cache (the attention backend's input)."""
    return HostLayout.build(query_lens, seq_lens, tables, block_size)


def step_arrays(record: StepRecord, batch: InputBatch, block_size: int) -> StepArrays:
    """Flatten the record's entries into host arrays (no device work). Records, in ``batch.prev_sample_index``,
    where each plain sampling row's token will sit in this step's sampled ids (the next step may read it)."""
    token_ids: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    sample_indices: list[int] = []
    sample_rows: list[int] = []
    in_flight_at: list[int] = []  # flat token index of each token the step in flight sampled ...
    in_flight_from: list[int] = []  # ... and its entry in that step's sampled ids
    prev_index = batch.prev_sample_index
    next_index: dict[str, int] = {}
    requests = batch.requests
    num_sampled = 0
    for row, entry in enumerate(record.scheduled):  # runs for every row of every step: kept lean
        req_id = entry.req_id
        state = requests[req_id]
        start, num, drafts = entry.num_computed_tokens, entry.num_tokens, entry.draft_token_ids
        known = state.token_ids
        known_end = start + num - len(drafts) if drafts else start + num  # drafts follow the sequence's own tokens
        num_known = len(known)
        host_end = known_end if known_end <= num_known else num_known
        if host_end - start == 1:
            token_ids.append(known[start])
        elif host_end > start:
            token_ids.extend(known[start:host_end])
        if known_end > host_end:  # the last token was sampled by the step still in flight
            source = prev_index.get(req_id)
            if known_end - host_end != 1 or source is None:
                raise RuntimeError(f"request {req_id!r}: {known_end - host_end} input token(s) unknown to the "
                                   "host and not sampled by the previous step")
            in_flight_at.append(len(token_ids))
            in_flight_from.append(source)
            token_ids.append(0)
        if drafts:
            token_ids.extend(drafts)
        query_lens.append(num)
        seq_lens.append(start + num)
        tables.append(state.block_table)
        if entry.samples:
            if drafts:  # k + 1 logit rows; the next input depends on acceptance, so the host must read it
                first = len(token_ids) - 1 - len(drafts)
                sample_indices.extend(range(first, len(token_ids)))
                num_sampled += 1 + len(drafts)
            else:
                sample_indices.append(len(token_ids) - 1)
                next_index[req_id] = num_sampled
                num_sampled += 1
            sample_rows.append(row)
    batch.prev_sample_index = next_index
    index = None
    if in_flight_at:
        index = np.full(len(token_ids), -1, dtype=np.int64)
        index[in_flight_at] = in_flight_from
    return StepArrays(np.asarray(token_ids, dtype=np.int64), index,
                      attention_layout(query_lens, seq_lens, tables, block_size),
                      np.asarray(sample_indices, dtype=np.int64), sample_rows)


def upload_step(
    host: StepArrays, device: torch.device | str, prev_sampled: torch.Tensor | None, *, backend: AttentionBackend,
) -> ModelInputs:
    """One host-to-device copy; ``prev_sampled``: the previous step's sampled ids (needed when tokens are in
    flight). The attention ``backend`` names the layout arrays it needs and builds its metadata from them."""
    layout = host.layout
    arrays = [host.token_ids, layout.positions, host.sample_indices]
    if host.in_flight_index is not None:
        if prev_sampled is None:
            raise RuntimeError("input tokens in flight need the previous step's sampled ids on this rank")
        arrays.append(host.in_flight_index)
    ids, positions, samples, *rest = upload_arrays(
        arrays + list(backend.metadata_arrays(layout)), device
    )
    in_flight = InFlightIds(prev_sampled, rest.pop(0)) if host.in_flight_index is not None else None
    return ModelInputs(
        input_ids=ids,
        positions=positions,
        meta=backend.prepare_metadata(layout, rest),
        sample_indices=samples,
        sample_rows=host.sample_rows,
        in_flight=in_flight,
    )
