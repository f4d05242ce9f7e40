"""Checkpoint tensors as (HF name, tensor) streams: safetensors read lazily, slice by slice.

A tensor-parallel rank reads only its rows/columns of each matrix (``LazySlice.narrow`` reads that part of the
file); with one rank the layers ask for whole tensors and the stream costs the same as reading them whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class LazySlice:
    """A checkpoint tensor not yet read: ``narrow`` reads only the asked-for rows/columns from the file."""

    def __init__(self, handle_slice: Any) -> None:
        self._slice = handle_slice
        self.shape = tuple(handle_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


def safetensors_shards(directory: Path) -> list[Path]:
    """The shard files of a single or sharded (index.json) safetensors checkpoint, in a stable order."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{directory} has no *.safetensors weights (pytorch_model.bin is not supported)")
    return shards


def iter_safetensors_slices(
    directory: Path, progress: bool = False
) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
    """(name, tensor) for vectors (norms, biases: small, every rank needs them whole) and (name, LazySlice) for
    matrices, over every shard of a single or sharded checkpoint."""
    from safetensors import safe_open

    shards = safetensors_shards(directory)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shards), desc="loading safetensors shards", unit="shard")
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                if len(part.get_shape()) < 2:
                    yield name, handle.get_tensor(name)
                else:
                    yield name, LazySlice(part)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
