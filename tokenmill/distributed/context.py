"""ParallelContext: one rank's view of its tensor-parallel group, with the few collectives TP needs.

Groups are built straight from a rendezvous store (no default process group), so several engines can live in
one process one after another; every collective carries the group's timeout, so a dead peer raises, never hangs.
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from tokenmill.distributed.custom_all_reduce import CustomAllReduce

logger = logging.getLogger(__name__)


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    group: dist.ProcessGroup | None  # None only when world_size == 1
    custom: CustomAllReduce | None = None  # small all-reduces on GPUs (see distributed/custom_all_reduce.py)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}); got {self.rank}")
        if self.world_size > 1 and self.group is None:
            raise ValueError(f"a process group is required when world_size ({self.world_size}) > 1")

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group in place and return it."""
        if self.world_size == 1:
            return tensor
        if self.custom is not None and self.custom.takes(tensor):
            return self.custom.all_reduce(tensor)
        assert self.group is not None
        self.group.allreduce([tensor]).wait()
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` (same shape on all ranks) along ``dim``, in rank order."""
        if self.world_size == 1:
            return tensor
        assert self.group is not None
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.group.allgather([parts], [tensor]).wait()
        return torch.cat(parts, dim=dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s copy (same shape and dtype on all ranks)."""
        if self.world_size == 1:
            return tensor
        assert self.group is not None
        options = dist.BroadcastOptions()
        options.rootRank = src
        self.group.broadcast([tensor], options).wait()
        return tensor

    def close(self, timeout_s: float = 30.0) -> bool:
        """Drop this rank's communicator without waiting for peers (they may be gone already), so that NCCL's
        background threads end before the rendezvous file is removed; no collective works afterwards.

        Drop every CUDA graph that captured a collective first: NCCL's abort waits until those graphs are
        destroyed. The abort runs in a daemon thread because a kernel stuck on a dead peer can still block it;
        returns False when it did not finish within ``timeout_s``."""
        custom, self.custom = self.custom, None
        group, self.group = self.group, None  # the group's threads end once it is released

        def release() -> None:
            try:
                abort = getattr(group, "abort", None)
                if abort is not None:
                    abort()  # first: it also ends NCCL kernels still waiting on a peer
                if custom is not None:
                    custom.close()
            except RuntimeError as exc:
                logger.warning("rank %d: closing the communicator failed: %s", self.rank, exc)

        closer = threading.Thread(target=release, name=f"tokenmill-tp-close-rank{self.rank}", daemon=True)
        closer.start()
        closer.join(timeout_s)
        return not closer.is_alive()

    def barrier(self) -> None:
        if self.world_size > 1:
            assert self.group is not None
            self.group.barrier().wait()


def create_parallel_context(
    rank: int, world_size: int, store_path: Path, device: str, timeout_s: float = 60.0,
    custom_all_reduce: bool = False,
) -> ParallelContext:
    """Join the group of ``world_size`` ranks meeting at the file ``store_path`` (a fresh temp file per group):
    NCCL when ``device`` is a GPU, gloo otherwise. ``custom_all_reduce``: also set up the one-shot all-reduce's
    shared buffers on that GPU."""
    if world_size == 1:
        return ParallelContext(0, 1, None)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.FileStore(str(store_path), world_size)
    store.set_timeout(timeout)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group: dist.ProcessGroup = dist.ProcessGroupNCCL(store, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
    custom = None
    if custom_all_reduce:  # TPExecutor refuses it off CUDA before any process starts
        from tokenmill.distributed.custom_all_reduce import CustomAllReduce

        custom = CustomAllReduce(rank, world_size, store, torch.device(device))
    return ParallelContext(rank, world_size, group, custom)
