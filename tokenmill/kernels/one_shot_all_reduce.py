"""One-shot all-reduce for small tensors across the GPUs of one host (Triton), over buffers shared by CUDA IPC.

A decode step of a tensor-parallel Llama does two all-reduces per layer on a few KB to a few MB; NCCL's ring
pays ~10 µs of latency for each. Here every rank copies its input into its own shared buffer, tells each peer
through a flag in the peer's memory (release, system scope), waits for every peer's flag (acquire), then reads all
ranks' buffers and sums them in rank order in fp32 — the same bits on every rank. Program b of every rank handles
the same slice b and waits only for the peers' program b, so no grid-wide barrier is needed. Flags carry a per-
program call counter kept on the device (graph replays advance it too); data buffers alternate by its parity, so
a rank can only overwrite a buffer after every peer has entered the next call, i.e. finished reading it.
"""

from __future__ import annotations

import torch

from tokenmill.kernels._triton import HAS_TRITON, require_triton, tl, triton

MAX_WORLD = 8  # flag slots per program
MAX_PROGRAMS = 32
BLOCK = 1024  # elements per inner iteration

if HAS_TRITON:

    @triton.jit(do_not_specialize=["n", "chunk", "rank"])
    def _one_shot_all_reduce_kernel(
        inp_ptr,
        out_ptr,
        data_table,  # int64 [WORLD]: each rank's data buffer as mapped into this process
        flag_table,  # int64 [WORLD]: each rank's flag array (int32 [MAX_PROGRAMS, MAX_WORLD])
        counter_ptr,  # int32 [MAX_PROGRAMS], this rank's calls so far per program
        n,
        parity_stride,  # elements per parity half of a data buffer
        chunk,  # elements per program, a multiple of BLOCK
        rank,
        WORLD: tl.constexpr,
        MAX_WORLD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        epoch = tl.load(counter_ptr + pid) + 1
        half = (epoch & 1).to(tl.int64) * parity_stride
        elem = inp_ptr.dtype.element_ty
        own = tl.load(data_table + rank).to(tl.pointer_type(elem)) + half
        start = pid * chunk
        for off in range(start, start + chunk, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < n
            tl.store(own + idx, tl.load(inp_ptr + idx, mask=mask), mask=mask)
        tl.debug_barrier()  # every thread's copy is done before the flag says so
        for r in tl.static_range(WORLD):
            if r != rank:
                peer_flags = tl.load(flag_table + r).to(tl.pointer_type(tl.int32))
                tl.atomic_xchg(peer_flags + pid * MAX_WORLD + rank, epoch, sem="release", scope="sys")
        own_flags = tl.load(flag_table + rank).to(tl.pointer_type(tl.int32))
        for r in tl.static_range(WORLD):
            if r != rank:
                # A peer may already be one call ahead (flag epoch + 1): compare by signed difference.
                while tl.atomic_add(own_flags + pid * MAX_WORLD + r, 0, sem="acquire", scope="sys") - epoch < 0:
                    pass
        tl.debug_barrier()
        for off in range(start, start + chunk, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < n
            acc = tl.zeros([BLOCK], tl.float32)
            for r in tl.static_range(WORLD):
                src = tl.load(data_table + r).to(tl.pointer_type(elem)) + half
                acc += tl.load(src + idx, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
            tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(counter_ptr + pid, epoch)


def launch_shape(n: int) -> tuple[int, int]:
    """(programs, elements per program) for ``n`` elements: ~16 K elements per program, at most MAX_PROGRAMS."""
    programs = max(1, min(MAX_PROGRAMS, _cdiv(n, 16 * BLOCK)))
    chunk = _cdiv(_cdiv(n, programs), BLOCK) * BLOCK
    return max(1, _cdiv(n, chunk)), chunk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def one_shot_all_reduce(
    tensor: torch.Tensor,
    data_table: torch.Tensor,
    flag_table: torch.Tensor,
    counters: torch.Tensor,
    parity_elems: int,
    rank: int,
    world_size: int,
) -> torch.Tensor:
    """Sum ``tensor`` over the ranks in place. Every rank must make the same calls with the same sizes, in the
    same order; the tables hold every rank's buffers (``world_size`` entries, this process's mappings)."""
    require_triton("one_shot_all_reduce")
    n = tensor.numel()
    if not tensor.is_contiguous() or n > parity_elems:
        raise ValueError(f"one_shot_all_reduce needs a contiguous tensor of at most {parity_elems} elements; got "
                         f"{tuple(tensor.shape)} (contiguous={tensor.is_contiguous()})")
    if not 1 <= world_size <= MAX_WORLD:
        raise ValueError(f"one_shot_all_reduce supports 1..{MAX_WORLD} ranks; got {world_size}")
    programs, chunk = launch_shape(n)
    _one_shot_all_reduce_kernel[(programs,)](
        tensor, tensor, data_table, flag_table, counters, n, parity_elems, chunk, rank,
        WORLD=world_size, MAX_WORLD=MAX_WORLD, BLOCK=BLOCK, num_warps=4,
    )
    return tensor
