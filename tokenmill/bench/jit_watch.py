"""Notice Triton compiling a kernel variant while a benchmark is being timed.

Triton compiles a new variant per constexpr set and per divisibility class of its int/pointer arguments;
one that first appears inside a timed run costs 0.1-0.3 s (or a disk-cache load) and lands in one step's
time. The benchmark records each compile with the step it fell in, so a timing that includes JIT says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JitCompile:
    kernel: str
    variant: str  # Triton's repr: launch options and each argument's specialization
    step: int  # index of the engine step (call of step()) in which it compiled
    seconds: float


@dataclass
class JitWatch:
    """Context manager chaining Triton's pre/post compile hooks; a no-op where Triton is absent."""

    compiles: list[JitCompile] = field(default_factory=list)
    step: int = 0
    # Called at once with (kernel, variant, seconds) for each compile (a server logs them as they happen).
    on_compile: Callable[[str, str, float], None] | None = None
    _knobs: Any = None
    _previous: tuple[Any, Any] = (None, None)
    _started: float = 0.0

    def __enter__(self) -> JitWatch:
        try:
            from triton import knobs
        except ImportError:  # no triton (CPU): nothing can compile
            return self
        self._knobs = knobs.runtime
        self._previous = (self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook)
        self._knobs.jit_cache_hook = self._before
        self._knobs.jit_post_compile_hook = self._after
        return self

    def __exit__(self, *exc: object) -> None:
        if self._knobs is not None:
            self._knobs.jit_cache_hook, self._knobs.jit_post_compile_hook = self._previous
            self._knobs = None

    def _before(self, **kwargs: Any) -> bool | None:
        self._started = time.perf_counter()
        previous = self._previous[0]
        return previous(**kwargs) if previous is not None else None  # True would skip the compile

    def _after(self, **kwargs: Any) -> bool | None:
        fn = kwargs.get("fn")
        name = getattr(fn, "name", None) or str(kwargs.get("key", "?"))
        variant = _describe(fn, kwargs.get("compile") or {}) or str(kwargs.get("repr", ""))
        seconds = time.perf_counter() - self._started
        self.compiles.append(JitCompile(name, variant, self.step, seconds))
        if self.on_compile is not None:
            self.on_compile(name, variant, seconds)
        previous = self._previous[1]
        return previous(**kwargs) if previous is not None else None

    def summary(self) -> list[dict[str, Any]]:
        return [{"kernel": c.kernel, "step": c.step, "seconds": round(c.seconds, 4), "variant": c.variant}
                for c in self.compiles]


def _describe(fn: Any, info: dict[str, Any]) -> str:
    """Constexpr values and specialized arguments (alignment / divisibility, == 1) by name: what made this
    variant differ from the ones compiled before."""
    try:
        names = list(fn.jit_function.arg_names)
        consts = [f"{names[k[0]]}={v}" for k, v in info.get("constants", {}).items() if len(k) == 1]
        attrs = (info.get("configs") or [{}])[0]
        special = [f"{names[k[0]]}:" + "/".join(f"{a[0].split('.')[-1]}={a[1]}" for a in v)
                   for k, v in attrs.items() if len(k) == 1 and v]
        return f"warps={info.get('num_warps')} stages={info.get('num_stages')}; {', '.join(consts)}; {', '.join(special)}"
    except Exception:  # a Triton version with another hook payload: fall back to its repr
        return ""
