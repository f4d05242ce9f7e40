"""Samples a process tree's CPU% (psutil) and the GPUs' utilisation (nvidia-smi) in the background.

``ResourceSampler({"server": pid, ...})`` starts both; ``mark(name)`` / ``end(name)`` bracket a phase; ``summary()`` gives, per
phase, the mean and p90 CPU% of each process (by name and pid; 100 = one core), each process's CPU% by thread
(the main thread, named threads such as ZMQbg/IO/0, and the unnamed rest, e.g. an OpenMP team, with their count)
and the mean GPU busy %.
nvidia-smi's utilisation is the share of time a kernel ran, so it is a rough "GPU busy", not SM occupancy.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from typing import Any


class ResourceSampler:
    def __init__(self, roots: dict[str, int], interval_s: float = 0.25) -> None:
        import psutil

        self._roots = {label: psutil.Process(pid) for label, pid in roots.items()}
        self._interval = interval_s
        self._cpu: list[tuple[float, dict[str, float]]] = []  # (time, {"name:pid": cpu%})
        self._gpu: list[tuple[float, float]] = []  # (time, utilisation %)
        self._phases: dict[str, list[float]] = {}
        # phase -> [thread CPU seconds at mark, at end]: {"label/name:pid": {thread group: (seconds, threads)}}
        self._thread_cpu: dict[str, list[dict[str, dict[str, tuple[float, int]]]]] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample_cpu, daemon=True)]
        self._smi: subprocess.Popen | None = None
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(interval_s * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self._threads.append(threading.Thread(target=self._read_gpu, daemon=True))
        for thread in self._threads:
            thread.start()

    def mark(self, name: str) -> None:
        self._thread_cpu[name] = [self._threads_snapshot()]
        self._phases[name] = [time.monotonic()]

    def end(self, name: str) -> None:
        self._phases[name].append(time.monotonic())
        self._thread_cpu[name].append(self._threads_snapshot())

    def _threads_snapshot(self) -> dict[str, dict[str, tuple[float, int]]]:
        """CPU seconds so far per process and thread group (Linux /proc thread names)."""
        import psutil

        snapshot: dict[str, dict[str, tuple[float, int]]] = {}
        for label, proc in self._processes():
            try:
                threads = proc.threads()
                key = f"{label}/{proc.name()}:{proc.pid}"
                times = proc.cpu_times()
            except psutil.Error:
                continue
            # The whole process too: threads that exited during the phase are in it only.
            groups: dict[str, tuple[float, int]] = {"process": (times.user + times.system, len(threads))}
            for thread in threads:
                if thread.id == proc.pid:
                    group = "main"
                else:
                    try:
                        with open(f"/proc/{proc.pid}/task/{thread.id}/comm") as f:
                            comm = f.read().strip()
                    except OSError:
                        comm = "?"
                    # Unnamed threads carry the process's name: torch's OpenMP team, Python threads.
                    group = "unnamed" if comm == proc.name()[:15] else comm
                seconds, count = groups.get(group, (0.0, 0))
                groups[group] = (seconds + thread.user_time + thread.system_time, count + 1)
            snapshot[key] = groups
        return snapshot

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    def _processes(self) -> list[tuple[str, Any]]:
        import psutil

        found: dict[int, tuple[str, Any]] = {}  # a pid counts once, under the first tree that holds it
        for label, root in self._roots.items():
            try:
                for proc in (root, *root.children(recursive=True)):
                    found.setdefault(proc.pid, (label, proc))
            except psutil.Error:
                continue
        return list(found.values())

    def _sample_cpu(self) -> None:
        import psutil

        known: dict[int, Any] = {}
        while not self._stop.is_set():
            sample: dict[str, float] = {}
            for label, proc in self._processes():
                proc = known.setdefault(proc.pid, proc)  # cpu_percent measures since this object's last call
                try:
                    sample[f"{label}/{proc.name()}:{proc.pid}"] = proc.cpu_percent(None)
                except psutil.Error:
                    continue
            self._cpu.append((time.monotonic(), sample))
            self._stop.wait(self._interval)

    def _read_gpu(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            values = [float(v) for v in line.split(",") if v.strip().replace(".", "", 1).isdigit()]
            if values:
                self._gpu.append((time.monotonic(), statistics.fmean(values)))
            if self._stop.is_set():
                return

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, bounds in self._phases.items():
            if len(bounds) != 2:
                continue
            start, end = bounds
            # psutil's first reading of a process is 0.0 by definition; skip it by starting one interval late.
            cpu = [s for t, s in self._cpu if start + self._interval <= t <= end]
            per_proc: dict[str, list[float]] = {}
            for sample in cpu:
                for proc, value in sample.items():
                    per_proc.setdefault(proc, []).append(value)
            gpu = [u for t, u in self._gpu if start <= t <= end]
            out[name] = {
                "seconds": end - start,
                "cpu_percent": {
                    proc: {"mean": statistics.fmean(v), "p90": _p90(v), "samples": len(v)}
                    for proc, v in per_proc.items() if v
                },
                "gpu_busy_percent_mean": statistics.fmean(gpu) if gpu else None,
                "gpu_samples": len(gpu),
                "thread_cpu_percent": self._thread_summary(name, end - start),
            }
        return out

    def _thread_summary(self, name: str, seconds: float) -> dict[str, dict[str, dict[str, float]]]:
        """Per process: CPU% of each thread group over the phase and its thread count at the end ("process": all
        of its threads, exited ones included)."""
        snapshots = self._thread_cpu.get(name, [])
        if len(snapshots) != 2 or seconds <= 0:
            return {}
        before, after = snapshots
        out: dict[str, dict[str, dict[str, float]]] = {}
        for proc, groups in after.items():
            rows = {}
            for group, (cpu_s, count) in groups.items():
                start_s = before.get(proc, {}).get(group, (0.0, 0))[0]
                rows[group] = {"cpu_percent": round(100 * (cpu_s - start_s) / seconds, 1), "threads": count}
            if any(row["cpu_percent"] >= 1 for row in rows.values()):
                out[proc] = rows
        return out


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
