"""Guarded Triton import: kernels modules must import on CPU-only machines where Triton is absent.

Each kernel module defines its @triton.jit functions under ``if HAS_TRITON:`` and its launcher calls
``require_triton()`` first, so the pure-torch references stay usable everywhere.

Programmatic dependent launch (PDL, Hopper and later): a decode step is a chain of ~10 kernels per layer,
most of them a few microseconds long, so each launch's start-up and the previous kernel's tail are a
visible share of the step. A kernel launched with ``launch_pdl`` may start while its predecessor finishes;
it calls ``pdl_wait_for_producer`` before it touches any activation, which blocks until the predecessor has
completed and its writes are visible. Every PDL-launched kernel waits unconditionally, so completion stays
in stream order and a kernel reading an output from two launches back is still safe.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

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


@functools.cache
def _device_has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(x: torch.Tensor, requested: bool | None = None) -> bool:
    """Launch with programmatic dependent launch? ``requested`` None: wherever the device supports it."""
    if not (HAS_TRITON and x.is_cuda) or requested is False:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _device_has_pdl(index)


def pdl_options(enabled: bool) -> dict[str, Any]:
    """Launch keyword arguments for a kernel taking a ``PDL`` constexpr."""
    return {"PDL": True, "launch_pdl": True} if enabled else {"PDL": False}


if HAS_TRITON:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def pdl_wait_for_producer(PDL: tl.constexpr):
        # Wait for the previous kernel, then let the next one start launching while this one runs.
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
