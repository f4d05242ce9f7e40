"""Guarded Triton import: kernels modules must import on CPU-only machines where Triton is absent.

Each kernel module defines its @triton.jit functions under ``if HAS_TRITON:`` and its launcher calls
``require_triton()`` first, so the pure-torch references stay usable everywhere.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU CI has no triton; references still work.
    triton = None
    tl = None

HAS_TRITON = triton is not None

if HAS_TRITON:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """First statement of every kernel launched through ``pdl_launch``: a kernel launched early
        (programmatic dependent launch) waits here until the previous kernel has finished and its writes are
        visible; without PDL it compiles to nothing. PDL == 2 (PDL_EARLY_LAUNCH) then also lets the next kernel
        launch (griddepcontrol.launch_dependents) instead of at this one's end: its programs may sit resident
        and issue loads that do not depend on this kernel (kernels/w4_gemv.py's preload) while this one runs.
        After the wait, not before, so at most one kernel ahead is resident."""
        if PDL:
            gdc_wait()
            if PDL == 2:
                gdc_launch_dependents()

else:
    pdl_wait = None


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            f"{what} needs the 'triton' package (install tokenmill[gpu]); use the torch reference instead"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1); Triton block shapes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _pdl_on(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("TOKENMILL_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Launch with programmatic dependent launch (Hopper and newer, compiled kernels): the kernel may start while
    the one before it drains and waits (``pdl_wait``, first thing in every kernel that takes a PDL flag) before it
    touches memory. Saves ~0.3-0.5 µs per kernel boundary inside a decode graph (benchmarks/gpu_pdl_probe.py);
    ``pdl_launch`` applies it to small launches only. ``TOKENMILL_PDL=0`` turns it off for A/B runs (read once
    per process)."""
    if device.type != "cuda" or not HAS_TRITON:
        return False
    return _pdl_on(device.index if device.index is not None else torch.cuda.current_device())


# Above this many rows (tokens, sequences) launches stay plain. On the H100, PDL made decode steps 0.3-1% faster
# at 1-4 rows and nothing measurable at 16 and more (a first reading of -0.5% at 256 rows recurred with PDL off
# there, so it was noise); large launches are long enough that the saved gap does not show
# (benchmarks/results/gpu_pdl_ab_2026-11-24.json).
PDL_MAX_ROWS = 64


# pdl_wait's PDL value for "wait, then let the next kernel launch"; True: wait only (the next kernel launches when
# this one's programs exit).
PDL_EARLY_LAUNCH = 2


@functools.cache
def pdl_early_launch() -> bool:
    """``TOKENMILL_PDL_EARLY_LAUNCH=1``: PDL kernels release the next kernel right after their wait (read once per
    process). Off by default: the H100's PDL probe found an early release alone slightly slower (1.21 vs 1.13 µs
    a link, benchmarks/results/gpu_pdl_probe_2026-11-24.json); it pays only where the next kernel has loads to
    issue before its wait (benchmarks/gpu_w4_chain.py measures it)."""
    return os.environ.get("TOKENMILL_PDL_EARLY_LAUNCH", "0") == "1"


def pdl_launch(device: torch.device, rows: int) -> dict[str, bool | int]:
    """Launch keywords for a kernel with a ``PDL`` constexpr over ``rows`` rows: the flag and Triton's
    ``launch_pdl`` go together, since a kernel launched early must wait (``pdl_wait``) before touching memory."""
    on = rows <= PDL_MAX_ROWS and use_pdl(device)
    return {"PDL": (PDL_EARLY_LAUNCH if pdl_early_launch() else True) if on else False, "launch_pdl": on}
