"""Small host → device copies for the sampler's per-step tensors (indices, per-row knobs, token ids).

A plain .to('cuda') from pageable memory makes PyTorch wait for the stream; pinned + non_blocking does not.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch


def to_device(
    values: Sequence[int] | Sequence[float] | array, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A 1-D tensor of ``values`` on ``device``, copied without stalling the CUDA stream."""
    if isinstance(values, array):
        # An int64 array buffer converts far faster than a list; frombuffer rejects an empty buffer.
        cpu = (
            torch.frombuffer(values, dtype=torch.int64).to(dtype)
            if len(values)
            else torch.zeros(0, dtype=dtype)
        )
    else:
        cpu = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return cpu
    # The caching host allocator keeps the pinned block alive until the async copy has finished.
    return cpu.pin_memory().to(device, non_blocking=True)
