"""Copy a decode step's inputs into a CUDA graph's fixed buffers, in one launch.

A replayed decode graph reads its token ids, positions, cache slots, sequence lengths and block tables from fixed
buffers. Filling them with torch ops took ~12 small kernels between two graphs (copies, padding fills, and the
five ops that swap placeholder ids for the in-flight step's sampled ids). This kernel does all of it: one program
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


def resolve_placeholders(input_ids: torch.Tensor, placeholder_ids: torch.Tensor | None) -> torch.Tensor:
    """``input_ids`` with each placeholder -(j + 1) replaced by ``placeholder_ids[j]`` (the in-flight step's
    sampled ids); unchanged when there are none."""
    if placeholder_ids is None:
        return input_ids
    return torch.where(input_ids >= 0, input_ids, placeholder_ids[(-input_ids - 1).clamp(min=0)])


def stage_decode_inputs_reference(
    dst: GraphInputs,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    size: int,
    placeholder_ids: torch.Tensor | None = None,
) -> None:
    """Torch ops doing what the kernel does. A negative id -(j + 1) takes ``placeholder_ids[j]``."""
    _check(dst, input_ids, block_tables, size)
    batch, width = block_tables.shape
    dst.input_ids[:batch].copy_(resolve_placeholders(input_ids, placeholder_ids))
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
        placeholder_ptr,
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
        HAS_PLACEHOLDERS: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        row = tl.program_id(0)
        if row < batch:
            token = tl.load(ids_ptr + row)
            if HAS_PLACEHOLDERS:
                sampled = tl.load(placeholder_ptr + tl.maximum(-token - 1, 0), mask=token < 0, other=0)
                token = tl.where(token < 0, sampled, token)
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
    placeholder_ids: torch.Tensor | None = None,
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
    _stage_decode_inputs_kernel[(size,)](
        input_ids,
        input_ids if placeholder_ids is None else placeholder_ids,
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
        HAS_PLACEHOLDERS=placeholder_ids is not None,
        BLOCK_W=128,
    )
