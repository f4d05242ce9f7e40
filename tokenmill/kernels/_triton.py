"""Guarded Triton import: kernels modules must import on CPU-only machines where Triton is absent.

Each kernel module defines its @triton.jit functions under ``if HAS_TRITON:`` and its launcher calls
``require_triton()`` first, so the pure-torch references stay usable everywhere.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU CI has no triton; references still work.
    triton = None
    tl = None

HAS_TRITON = triton is not None


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"{what} needs the 'triton' package (install tokenmill[gpu]); use the torch reference instead"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block shapes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())
