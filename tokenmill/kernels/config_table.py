"""Measured kernel-config tables (JSON under kernels/configs/, keyed by device name first): reading one and naming
the device to look up. Used by quant_dispatch.py (quantized linears) and paged_decode_config.py (decode attention)."""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch


@functools.cache
def load_table(path: str) -> dict[str, Any]:
    """The table at ``path`` ({} when there is none), read once: lookups run on every eager call."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


@functools.cache
def _cuda_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def device_name(device: torch.device) -> str:
    """The table key of ``device``: the CUDA device name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
