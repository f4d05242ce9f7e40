"""What torch's OpenMP team costs a GPU engine-core loop whose only CPU tensor work is the step's input copy.

A stand-in step, per thread count: copy the step's packed inputs (``--copy-bytes``, as transfer.upload_arrays
copies them into pinned memory: above 32k elements torch runs the copy as an OpenMP parallel region), then keep
the main thread busy for ``--host-ms`` (the rest of the step's Python and the spin-wait on the GPU's event), while
``--busy-procs`` other processes spin (the API process and the load generator beside the core). Reported: the copy's
median / p99 / max time and the process's CPU% (the team's spinning shows there). No GPU needed; the numbers
depend on the host and its load, so compare thread counts within one run only.

    python benchmarks/core_threads.py --steps 400 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path


def _spin(stop: mp.Event) -> None:  # type: ignore[valid-type]
    while not stop.is_set():
        pass


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(threads: int, copy_bytes: int, host_ms: float, steps: int) -> dict[str, float]:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    packed = np.random.default_rng(0).integers(0, 255, copy_bytes, dtype=np.uint8)
    copies = []
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        torch.from_numpy(packed).clone()
        copies.append(time.perf_counter() - t0)
        until = time.perf_counter() + host_ms / 1e3
        while time.perf_counter() < until:
            pass
    wall = time.perf_counter() - wall0
    copies.sort()
    return {"threads": threads, "copy_median_us": 1e6 * copies[len(copies) // 2],
            "copy_p99_us": 1e6 * copies[int(0.99 * (len(copies) - 1))], "copy_max_us": 1e6 * copies[-1],
            "step_mean_ms": 1e3 * wall / steps, "process_cpu_percent": 100 * (_cpu_seconds() - cpu0) / wall}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                   help="torch thread counts to compare (default: 1 and torch's default here)")
    p.add_argument("--copy-bytes", type=int, default=60_000, help="packed step inputs (a 256-sequence decode: ~50 KB)")
    p.add_argument("--host-ms", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--busy-procs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="spinning processes beside the loop (the API process and the load generator)")
    p.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    args = p.parse_args(argv)
    stop = mp.Event()
    busy = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy_procs)]
    for proc in busy:
        proc.start()
    try:
        rows = [measure(int(n), args.copy_bytes, args.host_ms, args.steps) for n in args.threads.split(",")]
    finally:
        stop.set()
        for proc in busy:
            proc.join(timeout=5)
    print(f"{os.cpu_count()} CPUs, {args.busy_procs} busy processes beside the loop, {args.copy_bytes} B copy + "
          f"{args.host_ms} ms host work per step")
    print(f"{'threads':>7} {'copy median us':>15} {'copy p99 us':>12} {'copy max us':>12} {'step ms':>8} {'CPU %':>6}")
    for r in rows:
        print(f"{r['threads']:>7} {r['copy_median_us']:>15.0f} {r['copy_p99_us']:>12.0f} {r['copy_max_us']:>12.0f} "
              f"{r['step_mean_ms']:>8.2f} {r['process_cpu_percent']:>6.0f}")
    if args.out:
        stamp = dt.datetime.now(dt.UTC)
        record = {"benchmark": "core_threads", "date": stamp.isoformat(timespec="seconds"),
                  "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                  "command": shlex.join([sys.executable, *sys.argv]), "args": vars(args), "rows": rows}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"core_threads_{stamp.strftime('%Y%m%dT%H%M%S')}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
