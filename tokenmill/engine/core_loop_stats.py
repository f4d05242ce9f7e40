"""The engine-core loop's own account of its time, logged once when the loop ends.

Three things the served path can lose against the offline engine and that only the core process sees:
- where a loop turn goes: engine steps, reading + applying messages, stats + encode + send, waiting for work;
- how long ``engine.step()`` takes by kind of step launched: decode-only steps replay CUDA graphs, steps with
  prompt tokens run eagerly (the inter-token latency every running request sees when a prompt joins);
- Triton compiling a kernel variant while serving (each one stalls a step by 0.1-0.7 s), logged as it happens.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

logger = logging.getLogger("tokenmill.engine.core")

LOOP_PARTS = ("step", "inbox", "send", "idle")


class CoreLoopStats:
    def __init__(self) -> None:
        self.loop_seconds = dict.fromkeys(LOOP_PARTS, 0.0)
        # engine.step() wall seconds by the kind of step it launched (async scheduling: it also lands the one before)
        self.step_seconds: dict[str, list[float]] = {"decode": [], "prompt": []}
        self.num_steps = 0
        self.jit_compiles: list[tuple[str, float]] = []
        self._jit: Any = None

    def watch_jit(self) -> None:
        """Log every Triton compile from now on (no-op without Triton)."""
        from tokenmill.bench.jit_watch import JitWatch

        self._jit = JitWatch(on_compile=self._on_compile).__enter__()

    def stop_jit(self) -> None:
        if self._jit is not None:
            self._jit.__exit__(None, None, None)
            self._jit = None

    def _on_compile(self, kernel: str, variant: str, seconds: float) -> None:
        self.jit_compiles.append((kernel, seconds))
        logger.warning("Triton compiled %s while serving (%.2f s, inside engine step %d): %s", kernel, seconds,
                       self.num_steps, variant)

    def record_step(self, seconds: float, launched: Any) -> None:
        """``launched``: the engine's in-flight step after step() (None: it landed already, kind unknown)."""
        self.num_steps += 1
        if launched is None:
            return
        scheduled = launched.sched.scheduled
        # Entries are sorted with one-token rows first: the last one tells whether any row carries a prompt chunk.
        if scheduled and scheduled[-1].num_tokens != 1 and not scheduled[-1].draft_token_ids:
            self.step_seconds["prompt"].append(seconds)
        else:
            self.step_seconds["decode"].append(seconds)

    def summary_line(self) -> str:
        spent = self.loop_seconds
        total = sum(spent.values()) or 1.0
        parts = [f"{name} {seconds:.2f} s ({100 * seconds / total:.0f}%)" for name, seconds in spent.items()]
        for kind, times in self.step_seconds.items():
            if times:
                ordered = sorted(times)
                parts.append(f"{kind} steps {len(times)}: step() p50 {1e3 * statistics.median(ordered):.1f} ms "
                             f"p99 {1e3 * ordered[int(0.99 * (len(ordered) - 1))]:.1f} ms")
        if self.jit_compiles:
            parts.append(f"Triton compiles while serving {len(self.jit_compiles)} "
                         f"({sum(s for _, s in self.jit_compiles):.2f} s)")
        return f"engine core loop: {self.num_steps} steps; " + ", ".join(parts)
