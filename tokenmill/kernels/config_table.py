"""Measured kernel-config tables (JSON under kernels/configs/, keyed by device name first): reading one and naming
the device to look up. Used by quant_dispatch.py (quantized linears) and paged_decode_config.py (decode attention).

A card without an entry of its own takes the entry its architecture's key names: ``"sm_90": "NVIDIA H100 80GB
HBM3"`` gives an H200 (the same 132 SMs and L2, more bandwidth) the H100's measured configs instead of untuned
defaults. A card's own entry, once measured, wins."""

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


@functools.cache
def _cuda_arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def device_name(device: torch.device) -> str:
    """The table key of ``device``: the CUDA device name ("NVIDIA H100 80GB HBM3"), or "cpu"."""
    return device_keys(device)[0]


def device_keys(device: torch.device) -> tuple[str, ...]:
    """The table keys ``device`` is looked up under, in order: its name, then (CUDA) its architecture ("sm_90")."""
    if device.type != "cuda":
        return ("cpu",)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (_cuda_name(index), _cuda_arch(index))


def device_entries(table: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """The table's entries under the first of ``keys`` it has; an architecture key's value is the name of the card
    whose entries it takes. {} when none matches (the callers' defaults)."""
    for key in keys:
        if key in table:
            entries = table[key]
            return table.get(entries, {}) if isinstance(entries, str) else entries
    return {}
