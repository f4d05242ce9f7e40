"""Triton GPU kernels, each with a pure-torch reference beside it; ``ops`` picks one per device.

Modules import without Triton (CPU CI); launching a Triton kernel there raises a clear RuntimeError.
"""

from tokenmill.kernels.ops import apply_rotary, rms_norm, silu_and_mul

__all__ = ["apply_rotary", "rms_norm", "silu_and_mul"]
