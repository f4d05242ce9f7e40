"""The size of torch's CPU thread team for a process that runs an engine."""

from __future__ import annotations

import os

import torch


def set_engine_threads(on_cpu: bool) -> int:
    """Size torch's OpenMP team for this process (returns the count). An OMP_NUM_THREADS the user set wins.

    Every worker of the team must run before a parallel region ends, and after one each worker spins for a
    while before sleeping. On CPU (the engine-core process) the forward pass needs the team, but one core is left
    to the API process: on a loaded 2-core VM, 2 threads made a tiny model's decode step ~20x slower than 1. On a
    GPU the step's CPU tensor work is small copies (the step's packed inputs into pinned memory: parallel above
    32k bytes, i.e. every step), so a team only spins: the H100 run at 96c87b8 had the engine-core process at ~5
    cores (p90 7-10) beside the API process and the load generator, and one team member descheduled stalls the
    step loop at the region's end (benchmarks/core_threads.py measures it). vLLM runs its GPU workers with one
    thread for the same reason. The offline engine on a GPU (LLM, bench throughput) takes the same setting: in
    one H100 run it was the slower side, 10,414 tok/s against 11,694 for the server with a one-thread core.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 2) - 1) if on_cpu else 1
    torch.set_num_threads(threads)
    return threads
