"""The one-shot all-reduce across processes: exact sums, identical bits on every rank, inside CUDA graphs too.

Two processes share buffers through CUDA IPC. With one GPU both ranks run on it (contexts time-slice, so each
wait lasts until the peer's turn: slow but a real test of the IPC mapping, the flags and the parity halves);
with two GPUs each rank has its own. Every rank regenerates every rank's inputs from seeds, so each checks the
exact expected sum, computed the way the kernel does (fp32 in rank order, one rounding).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

_RANK_SCRIPT = r"""
import sys, torch, torch.distributed as dist
from tokenmill.distributed.custom_all_reduce import CustomAllReduce
rank, world, store_path, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], torch.device(sys.argv[4])
torch.cuda.set_device(device)
store = dist.FileStore(store_path, world)
car = CustomAllReduce(rank, world, store, device, max_bytes=4 * 1024 * 1024)

def inputs(call, shape, dtype):
    gen = torch.Generator().manual_seed(1000 * call)
    return [torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype) for _ in range(world)]

def expect(parts):
    acc = torch.zeros(parts[0].shape, dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)

cases = [((1, 4096), torch.bfloat16), ((8, 4096), torch.float16), ((256, 4096), torch.bfloat16),
         ((512, 4096), torch.bfloat16), ((3, 1000), torch.float32), ((7,), torch.bfloat16)]
call = 0
for _ in range(3):
    for shape, dtype in cases:
        parts = inputs(call, shape, dtype)
        out = car.all_reduce(parts[rank].to(device))
        assert torch.equal(out.cpu(), expect(parts)), (rank, call, shape, dtype)
        call += 1

# In a CUDA graph: the replays advance the device-side call counters like eager calls do.
x = torch.empty(64, 4096, dtype=torch.bfloat16, device=device)
y = torch.empty_like(x)
stream = torch.cuda.Stream(device)
with torch.cuda.stream(stream):
    y.copy_(x); car.all_reduce(y)  # warm-up outside the capture, as the runner does
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y.copy_(x)
        car.all_reduce(y)
for _ in range(5):
    parts = inputs(call, x.shape, x.dtype)
    x.copy_(parts[rank])
    graph.replay()
    assert torch.equal(y.cpu(), expect(parts)), (rank, call, "graph")
    call += 1
torch.cuda.synchronize(device)
store.set(f"done/{rank}", "1")
for peer in range(world):
    store.get(f"done/{peer}")  # nobody frees its buffer while a peer may still read it
car.close()
print(f"rank {rank} OK after {call} calls", flush=True)
"""


def _run_ranks(tmp_path: Path, devices: list[str]) -> None:
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(rank), str(len(devices)), str(store), dev],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, dev in enumerate(devices)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0 and f"rank {rank} OK" in out, out[-3000:]


@pytest.mark.timeout(300)
def test_two_ranks_on_one_gpu(tmp_path):
    _run_ranks(tmp_path, ["cuda:0", "cuda:0"])


@pytest.mark.timeout(300)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_on_two_gpus(tmp_path):
    _run_ranks(tmp_path, ["cuda:0", "cuda:1"])
