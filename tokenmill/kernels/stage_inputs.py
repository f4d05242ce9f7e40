"""Copy a decode step's inputs into a CUDA graph's fixed buffers, in one launch.

A replayed decode graph reads its token ids, positions, cache slots, sequence lengths and block tables from fixed
buffers. Filling them with torch ops took ~12 small kernels between two graphs (copies, padding fills, and the
ops that read tokens still in flight from the previous step's sampled ids). This kernel does all of it: one program
per padded row; rows past the batch get slot -1 (the KV write skips them) and length 0 (attention writes zeros).
On the H100 a batch-1 decode step went from 5.746 to 5.722 ms
(benchmarks/results/gpu_step_anatomy_stage_b1_2026-11-24.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, require_triton, tl, triton


@dataclass(frozen=True)
class GraphInputs:
    """A graph's fixed input buffers (each sized for its largest batch)."""

    input_ids: torch.Tensor  # [max_batch] int64
    positions: torch.Tensor  # [max_batch] int64
    slot_mapping: torch.Tensor  # [max_batch] int64
    seq_lens: torch.Tensor  # [max_batch] int32
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32


def _check(dst: GraphInputs, input_ids: torch.Tensor, block_tables: torch.Tensor, size: int) -> None:
    batch, width = block_tables.shape
    if input_ids.shape[0] != batch or not batch <= size <= dst.input_ids.shape[0]:
        raise ValueError(f"need batch ({input_ids.shape[0]} ids, {batch} table rows) <= size ({size}) <= "
                         f"{dst.input_ids.shape[0]} graph rows")
    if width > dst.block_tables.shape[1]:
        raise ValueError(f"block table width {width} exceeds the graph's {dst.block_tables.shape[1]}")


@dataclass(frozen=True)
class InFlightIds:
    """Input tokens the host has not read yet (async scheduling): the device reads them from the previous step.

    Why an index array and not a marker inside the ids: token ids stay real ids everywhere (the host's copy of a
    sequence never holds a stand-in), the source of each input is explicit, and the array rides in the step's one
    host-to-device upload. The buffer is the previous step's sampler output itself: no copy, and tensor-parallel
    ranks already receive it by broadcast.
    """

    sampled: torch.Tensor  # [num_sampled_prev] int64: the previous step's sampled ids, on the device
    index: torch.Tensor  # [num_tokens] int64: entry of ``sampled`` that input token t is, or -1 (its id is known)


def resolve_in_flight(input_ids: torch.Tensor, in_flight: InFlightIds | None) -> torch.Tensor:
    """``input_ids`` with every token whose ``in_flight.index`` is >= 0 read from ``in_flight.sampled``."""
    if in_flight is None:
        return input_ids
    index = in_flight.index
    return torch.where(index < 0, input_ids, in_flight.sampled[index.clamp(min=0)])


def stage_decode_inputs_reference(
    dst: GraphInputs,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    size: int,
    in_flight: InFlightIds | None = None,
) -> None:
    """Torch ops doing what the kernel does. Row r's token is ``in_flight.sampled[in_flight.index[r]]`` where
    that index is >= 0."""
    _check(dst, input_ids, block_tables, size)
    batch, width = block_tables.shape
    dst.input_ids[:batch].copy_(resolve_in_flight(input_ids, in_flight))
    dst.positions[:batch].copy_(positions)
    dst.slot_mapping[:batch].copy_(slot_mapping)
    dst.slot_mapping[batch:size].fill_(-1)
    dst.seq_lens[:batch].copy_(seq_lens)
    dst.seq_lens[batch:size].fill_(0)
    dst.block_tables[:batch, :width].copy_(block_tables)


if HAS_TRITON:

    # Sizes and the table's row stride change every step: specializing on them (== 1, multiple of 16) would
    # compile new variants mid-run.
    @triton.jit(do_not_specialize=["batch", "width", "table_stride"])
    def _stage_decode_inputs_kernel(
        ids_ptr,
        source_ptr,
        sampled_ptr,
        pos_ptr,
        slot_ptr,
        lens_ptr,
        table_ptr,
        table_stride,
        dst_ids_ptr,
        dst_pos_ptr,
        dst_slot_ptr,
        dst_lens_ptr,
        dst_table_ptr,
        dst_table_stride,
        batch,
        width,
        HAS_IN_FLIGHT: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        row = tl.program_id(0)
        if row < batch:
            token = tl.load(ids_ptr + row)
            if HAS_IN_FLIGHT:
                source = tl.load(source_ptr + row)
                sampled = tl.load(sampled_ptr + tl.maximum(source, 0), mask=source >= 0, other=0)
                token = tl.where(source >= 0, sampled, token)
            tl.store(dst_ids_ptr + row, token)
            tl.store(dst_pos_ptr + row, tl.load(pos_ptr + row))
            tl.store(dst_slot_ptr + row, tl.load(slot_ptr + row))
            tl.store(dst_lens_ptr + row, tl.load(lens_ptr + row))
            src = table_ptr + row.to(tl.int64) * table_stride
            dst = dst_table_ptr + row.to(tl.int64) * dst_table_stride
            for start in range(0, width, BLOCK_W):
                cols = start + tl.arange(0, BLOCK_W)
                inside = cols < width
                tl.store(dst + cols, tl.load(src + cols, mask=inside), mask=inside)
        else:
            tl.store(dst_slot_ptr + row, -1)
            tl.store(dst_lens_ptr + row, 0)


def stage_decode_inputs(
    dst: GraphInputs,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    size: int,
    in_flight: InFlightIds | None = None,
) -> None:
    """Write rows ``[0, batch)`` of the step's inputs into ``dst`` and pad rows ``[batch, size)``."""
    require_triton("stage_decode_inputs")
    _check(dst, input_ids, block_tables, size)
    batch, width = block_tables.shape
    for name, t in (("input_ids", input_ids), ("positions", positions), ("slot_mapping", slot_mapping),
                    ("seq_lens", seq_lens)):
        if t.dim() != 1 or t.shape[0] != batch or (t.stride(0) != 1 and batch > 1):
            raise ValueError(f"{name} must be a contiguous [{batch}] tensor; got shape {tuple(t.shape)}")
    if width and block_tables.stride(1) != 1:
        raise ValueError("block_tables must have contiguous rows")
    if in_flight is not None and (in_flight.index.shape != (batch,) or in_flight.index.stride(0) != 1 and batch > 1):
        raise ValueError(f"in_flight.index must be a contiguous [{batch}] tensor; got {tuple(in_flight.index.shape)}")
    _stage_decode_inputs_kernel[(size,)](
        input_ids,
        input_ids if in_flight is None else in_flight.index,
        input_ids if in_flight is None else in_flight.sampled,
        positions,
        slot_mapping,
        seq_lens,
        block_tables,
        block_tables.stride(0),
        dst.input_ids,
        dst.positions,
        dst.slot_mapping,
        dst.seq_lens,
        dst.block_tables,
        dst.block_tables.stride(0),
        batch,
        width,
        HAS_IN_FLIGHT=in_flight is not None,
        BLOCK_W=128,
    )
