"""Does programmatic dependent launch (PDL) shorten a chain of dependent kernels inside a CUDA graph?

A decode step is a chain of ~300 kernels, each waiting for the one before; between two kernels the GPU idles for
the launch and the previous kernel's tail. With PDL (``launch_pdl=True`` and ``griddepcontrol``) the next kernel
may start while the previous one drains, and waits (``gdc_wait``) only before it reads the previous output.

Each probe kernel reads the previous kernel's one-float output, streams its own "weight" chunk of ``--kb`` KiB per
program (like a GEMV or a norm), and writes output + 1; after a chain of N kernels the value must be N, which checks
that the waits order the chain. Variants: plain launches; PDL with the wait only; PDL with the wait and an early
``gdc_launch_dependents``; and each of those behind a cuBLAS matmul (a real primary that does not trigger).
Prints a table (µs per kernel), writes JSON.

    python3 benchmarks/gpu_pdl_probe.py --out $OUT     # H100, ~1 min
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from gpu_record import write_record

from tokenmill.cuda_timing import median_event_ms

CHAIN = 256


def _build_kernel() -> Any:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _probe_kernel(src_ptr, dst_ptr, w_ptr, chunk, BLOCK: tl.constexpr, WAIT: tl.constexpr,
                      TRIGGER: tl.constexpr):
        pid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        base = w_ptr + pid * chunk
        if WAIT:
            gdc_wait()
        if TRIGGER:
            gdc_launch_dependents()
        for start in range(0, chunk, BLOCK):
            acc += tl.load(base + start + offs).to(tl.float32)
        value = tl.load(src_ptr) + 1.0 + 0.0 * tl.sum(acc)
        tl.store(dst_ptr + pid, value)

    return _probe_kernel


def run_chain(kernel: Any, bufs: list[torch.Tensor], weight: torch.Tensor, programs: int, chunk: int,
              pdl: bool, trigger: bool, mm: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    for i in range(CHAIN):
        src, dst = bufs[i % 2], bufs[(i + 1) % 2]
        if mm is not None:
            torch.mm(mm[0], mm[1])  # a primary in stream order that never triggers its dependents
        kernel[(programs,)](src, dst, weight, chunk, BLOCK=1024, WAIT=pdl, TRIGGER=trigger, launch_pdl=pdl,
                            num_warps=4)


def time_graph(fn: Any, reps: int = 20) -> float:
    """Median µs of one replay of a graph captured around ``fn``."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return 1e3 * median_event_ms(graph.replay, reps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="1x8,132x8,132x32,528x16", help="PROGRAMSxKIB per program")
    args = parser.parse_args()
    kernel = _build_kernel()
    rows: list[dict[str, Any]] = []
    a = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)  # 8 MiB: a ~3 µs cuBLAS primary
    for item in args.sizes.split(","):
        programs, kib = (int(v) for v in item.split("x"))
        chunk = kib * 1024 // 2
        weight = torch.randn(programs * chunk, device="cuda", dtype=torch.bfloat16)
        for with_mm in (False, True):
            for variant, pdl, trigger in (("plain", False, False), ("pdl_wait", True, False),
                                          ("pdl_wait_trigger", True, True)):
                bufs = [torch.zeros(programs, device="cuda"), torch.zeros(programs, device="cuda")]

                def chain(bufs=bufs, weight=weight, programs=programs, chunk=chunk, pdl=pdl, trigger=trigger,
                          mm=(a, b) if with_mm else None) -> None:
                    bufs[0].zero_()
                    run_chain(kernel, bufs, weight, programs, chunk, pdl, trigger, mm)

                us = time_graph(chain)
                final = bufs[CHAIN % 2]
                ok = bool((final == float(CHAIN)).all().item())
                rows.append({"programs": programs, "kib_per_program": kib, "behind_cublas": with_mm,
                             "variant": variant, "us_per_link": us / CHAIN, "chain_correct": ok})
                print(f"{programs:>4} x {kib:>3} KiB {'cuBLAS+' if with_mm else '':<8}{variant:<18}"
                      f"{us / CHAIN:8.2f} us/link  correct={ok}", flush=True)
    write_record(Path(args.out) / "gpu_pdl_probe.json", "gpu_pdl_probe", chain=CHAIN, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
