"""Integer helpers shared by the engine, the runner and the kernels' launchers."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative ``a`` and positive ``b`` (blocks for tokens, tiles for rows)."""
    return -(-a // b)
