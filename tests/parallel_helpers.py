"""Single-process stand-ins for one tensor-parallel rank: layer tests build every rank's layer in one process and
combine the ranks' partial results themselves, so no collective may run."""

from __future__ import annotations

from tokenmill.distributed.context import ParallelContext


class NoCollectives:
    """Stands in for a process group; any use of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a collective ({name}) ran in a single-process layer test")


def rank_context(rank: int, world_size: int) -> ParallelContext:
    return ParallelContext(rank, world_size, NoCollectives() if world_size > 1 else None)
