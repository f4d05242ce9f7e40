"""The decode-graph staging kernel writes exactly what the torch ops it replaced write, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_triton_device, triton_device

from tokenmill.kernels.stage_inputs import (
    GraphInputs,
    InFlightIds,
    stage_decode_inputs,
    stage_decode_inputs_reference,
)

pytestmark = requires_triton_device

MAX_BATCH, MAX_BLOCKS = 64, 300


def random_buffers(gen: torch.Generator, device: str) -> GraphInputs:
    """Graph buffers holding a previous step's leftovers (random values, never zeros)."""
    def ints(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randint(-50, 5000, shape, generator=gen, dtype=dtype).to(device)

    return GraphInputs(ints(MAX_BATCH, dtype=torch.int64), ints(MAX_BATCH, dtype=torch.int64),
                       ints(MAX_BATCH, dtype=torch.int64), ints(MAX_BATCH, dtype=torch.int32),
                       ints(MAX_BATCH, MAX_BLOCKS, dtype=torch.int32))


def clone(b: GraphInputs) -> GraphInputs:
    return GraphInputs(*(t.clone() for t in (b.input_ids, b.positions, b.slot_mapping, b.seq_lens, b.block_tables)))


@pytest.mark.parametrize("batch,size,width", [(1, 1, 1), (3, 4, 7), (17, 32, 129), (64, 64, MAX_BLOCKS), (5, 8, 0)])
@pytest.mark.parametrize("with_in_flight", [False, True])
def test_staging_matches_the_torch_ops(batch, size, width, with_in_flight):
    device = triton_device()
    gen = torch.Generator().manual_seed(batch * 1000 + width)
    ids = torch.randint(0, 32000, (batch,), generator=gen)
    in_flight = None
    if with_in_flight:
        sampled = torch.randint(0, 32000, (batch + 3,), generator=gen).to(device)
        chosen = torch.rand(batch, generator=gen) < 0.7  # most rows, not all, wait on the in-flight step
        index = torch.where(chosen, torch.randperm(batch + 3, generator=gen)[:batch], -1)
        ids = torch.where(chosen, 0, ids)  # the host does not know those ids
        in_flight = InFlightIds(sampled, index.to(device))
    # One packed upload, as upload_step makes it: rows of the table are contiguous with stride = width.
    positions = torch.randint(0, 4096, (batch,), generator=gen)
    slots = torch.randint(0, 10**6, (batch,), generator=gen)
    seq_lens = torch.randint(1, 4096, (batch,), generator=gen, dtype=torch.int32)
    tables = torch.randint(0, 10**5, (batch, width), generator=gen, dtype=torch.int32)
    args = [t.to(device) for t in (ids, positions, slots, seq_lens, tables)]
    expected = random_buffers(gen, device)
    got = clone(expected)
    stage_decode_inputs_reference(expected, *args, size, in_flight)
    stage_decode_inputs(got, *args, size, in_flight)
    for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    if with_in_flight:
        assert (got.input_ids[:batch] >= 0).all()
    assert (got.slot_mapping[batch:size] == -1).all() and (got.seq_lens[batch:size] == 0).all()


def test_a_batch_larger_than_the_graph_is_refused():
    device = triton_device()
    buffers = random_buffers(torch.Generator().manual_seed(0), device)
    ids = torch.zeros(MAX_BATCH + 1, dtype=torch.int64, device=device)
    tables = torch.zeros(MAX_BATCH + 1, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="graph rows"):
        stage_decode_inputs(buffers, ids, ids, ids, ids.int(), tables, MAX_BATCH + 1)
    with pytest.raises(ValueError, match="width"):
        wide = torch.zeros(2, MAX_BLOCKS + 1, dtype=torch.int32, device=device)
        stage_decode_inputs(buffers, ids[:2], ids[:2], ids[:2], ids[:2].int(), wide, 2)
