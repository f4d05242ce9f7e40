"""The engine-core loop's own account of its time, logged once when the loop ends.

Three things the served path can lose against the offline engine and that only the core process sees:
- where a loop turn goes: engine steps, reading + applying messages, stats + encode + send, waiting for work;
- how long ``engine.step()`` takes by kind of step launched: decode-only steps replay CUDA graphs, steps with
  prompt tokens run eagerly (the inter-token latency every running request sees when a prompt joins);
- Triton compiling a kernel variant while serving (each one stalls a step by 0.1-0.7 s), logged as it happens.

With ``trace_path`` (the core reads it from ``TOKENMILL_STEP_TRACE``) every loop turn that stepped is also kept,
and written as JSON lines when the loop ends: perf_counter start (the same clock as a client on this host),
the turn's parts, the kind of step launched, its tokens and rows, and the messages applied before it. That is
what tells a slow inter-token gap's cause (a long step, admission work, sending) apart after a load test.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

logger = logging.getLogger("tokenmill.engine.core")

LOOP_PARTS = ("step", "inbox", "send", "idle")


class CoreLoopStats:
    def __init__(self, trace_path: str | None = None) -> None:
        self.loop_seconds = dict.fromkeys(LOOP_PARTS, 0.0)
        # engine.step() wall seconds by the kind of step it launched (async scheduling: it also lands the one before)
        self.step_seconds: dict[str, list[float]] = {"decode": [], "prompt": []}
        self.num_steps = 0
        self.jit_compiles: list[tuple[str, float]] = []
        self._jit: Any = None
        self.trace_path = trace_path
        self.trace: list[tuple] = []
        self._last_step: tuple[str, int, int] = ("none", 0, 0)  # kind, tokens, rows of the last step launched

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
            self._last_step = ("landed", 0, 0)
            return
        scheduled = launched.sched.scheduled
        # Entries are sorted with one-token rows first: the last one tells whether any row carries a prompt chunk.
        kind = "prompt" if scheduled and scheduled[-1].num_tokens != 1 and not scheduled[-1].draft_token_ids \
            else "decode"
        self.step_seconds[kind].append(seconds)
        if self.trace_path is not None:
            self._last_step = (kind, sum(entry.num_tokens for entry in scheduled), len(scheduled))

    def record_turn(self, start: float, idle: float, inbox: float, step: float, send: float,
                    num_messages: int) -> None:
        """One loop turn that ran a step (kept only when tracing)."""
        if self.trace_path is not None:
            self.trace.append((start, idle, inbox, step, send, num_messages, *self._last_step))

    def write_trace(self) -> None:
        if self.trace_path is None:
            return
        fields = ("start", "idle", "inbox", "step", "send", "messages", "kind", "tokens", "rows")
        with Path(self.trace_path).open("w") as f:
            for turn in self.trace:
                f.write(json.dumps(dict(zip(fields, turn, strict=True))) + "\n")
        logger.info("engine core: %d step turns traced to %s", len(self.trace), self.trace_path)

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
