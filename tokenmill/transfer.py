"""Small per-step host → device copies: the runner's step inputs and the sampler's indices and knobs.

A plain .to('cuda') from pageable memory makes PyTorch wait for the stream; pinned + non_blocking does not
(measured ~40 µs apiece on the H100 box, several per engine step). The caching host allocator keeps a pinned
block alive until its async copy has finished.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np
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
    return _copy(cpu, device)


def upload_arrays(arrays: Sequence[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """Host arrays (all of one dtype) → tensors on ``device`` with one copy for all of them (views of it)."""
    if len({a.dtype for a in arrays}) > 1:
        raise ValueError(f"upload_arrays takes arrays of one dtype; got {sorted({str(a.dtype) for a in arrays})}")
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype=np.int64)
    whole = _copy(torch.from_numpy(flat), torch.device(device))
    out, offset = [], 0
    for a in arrays:
        out.append(whole[offset : offset + a.size].view(a.shape))
        offset += a.size
    return out


def _copy(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return cpu.to(device)
    return cpu.pin_memory().to(device, non_blocking=True)
