"""Launch configs of the paged decode kernel (kernels/paged_attention.py) and the measured table that picks one.

A config is chosen per (device, KV storage dtype, batch) from ``configs/paged_decode.json`` (or the file
``TOKENMILL_PAGED_DECODE_CONFIGS`` names), as benchmarks/gpu_paged_decode_probe.py writes it: the entry of the
largest measured batch <= this batch. No entry: ``DecodeConfig()``, the launch that served before the table.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.config import FP8_DTYPES
from tokenmill.kernels.config_table import device_entries, device_keys, load_table

SHIPPED_CONFIGS = Path(__file__).parent / "configs" / "paged_decode.json"
_SHIPPED_PATH = str(SHIPPED_CONFIGS)  # eager steps look a config up every layer: no Path -> str each time
CONFIGS_ENV = "TOKENMILL_PAGED_DECODE_CONFIGS"
KV_CONVERTS = ("f32", "direct", "f16", "asm")


@dataclass(frozen=True)
class DecodeConfig:
    """How one decode launch runs; every field changes speed only, never the result beyond rounding.

    ``seqs_per_program`` 2 or 4 packs that many sequences into one program's padded GQA rows (rows = sequences x
    query heads of one KV head, 16 at least for the tensor cores), their keys read as one dense run: short
    contexts at large batches then pay the per-program set-up once per pack and no half-empty last tile per
    sequence (the key -> sequence map costs instructions per key instead) with ``pack_keys`` "run"; with "tiles"
    each sequence starts a tile (the map is per tile, scalars; last tiles part empty as unpacked), the K/V stream
    still one pipelined loop across the pack's sequences. It applies to unsplit plans of one query token; other
    launches run the per-sequence kernel.
    ``kv_convert`` (FP8 cache only): "f32" widens e4m3 through fp32 to the query's dtype (every sm89+ target has
    it), "direct" lets Triton pick the conversion to the query's dtype, "f16" widens to fp16 (packed e4m3x2 ->
    f16x2 on Hopper) and runs both products in fp16 (the query clamped to fp16's range; fp16 holds softmax
    weights more precisely than bf16), "asm" the same with the conversion in PTX, which keeps Triton from
    gathering FP8 bytes for the transposed V operand (e4m3 on CUDA; elsewhere it runs as "f16").
    ``heads_fastest``: program ids walk KV heads first, so the programs
    running together read neighbouring heads of the same tokens (one 1-2 KB run of the cache per token).
    ``min_partition``: the fewest keys a split takes (``plan_decode``'s floor): a short context at a small batch
    spreads over length / min_partition programs, each with that many keys to walk.
    """

    block_n: int = 64  # keys per inner iteration (the plan's block_n)
    num_warps: int = 4
    num_stages: int = 2
    seqs_per_program: int = 1
    kv_convert: str = "f32"
    heads_fastest: bool = False
    pack_keys: str = "tiles"  # packed programs: "tiles" (each sequence from a tile boundary) or "run" (dense)
    min_partition: int = 128

    def __post_init__(self) -> None:
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"DecodeConfig.block_n must be a power of two >= 16; got {self.block_n}")
        if self.seqs_per_program not in (1, 2, 4):
            raise ValueError(f"DecodeConfig.seqs_per_program must be 1, 2 or 4; got {self.seqs_per_program}")
        if self.pack_keys not in ("tiles", "run"):
            raise ValueError(f"DecodeConfig.pack_keys must be 'tiles' or 'run'; got {self.pack_keys!r}")
        if self.kv_convert not in KV_CONVERTS:
            raise ValueError(f"DecodeConfig.kv_convert must be one of {KV_CONVERTS}; got {self.kv_convert!r}")
        if self.min_partition < 16 or self.min_partition % 16:
            raise ValueError(f"DecodeConfig.min_partition must be a multiple of 16; got {self.min_partition}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"DecodeConfig needs num_warps in 1-16 (a power of two) and num_stages >= 1; got "
                             f"{self.num_warps}, {self.num_stages}")

    @property
    def name(self) -> str:
        """Short label (probe tables, logs): bn64_w4_s2 plus the non-default options."""
        parts = [f"bn{self.block_n}_w{self.num_warps}_s{self.num_stages}"]
        if self.seqs_per_program > 1:
            parts.append(f"pack{self.seqs_per_program}" + ("run" if self.pack_keys == "run" else ""))
        if self.kv_convert != "f32":
            parts.append(self.kv_convert)
        if self.heads_fastest:
            parts.append("hf")
        if self.min_partition != 128:
            parts.append(f"mp{self.min_partition}")
        return "_".join(parts)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> DecodeConfig:
        unknown = set(entry) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"paged decode config table: unknown fields {sorted(unknown)} in {entry}")
        return cls(**entry)


def kv_format(dtype: torch.dtype) -> str:
    """The table's key for a KV storage dtype: "fp8" (any float8) or "16bit" (bf16, fp16; fp32 reads the same)."""
    return "fp8" if dtype in FP8_DTYPES else "16bit"


def decode_config(device: torch.device, kv_dtype: torch.dtype, num_seqs: int) -> DecodeConfig:
    """The measured config for ``num_seqs`` sequences over a ``kv_dtype`` cache on ``device``; depends on shapes
    only (no host sync), so a CUDA graph captures the same launch every replay."""
    return _lookup(os.environ.get(CONFIGS_ENV) or _SHIPPED_PATH, device_keys(device), kv_format(kv_dtype), num_seqs)


@functools.cache
def _lookup(path: str, keys: tuple[str, ...], fmt: str, num_seqs: int) -> DecodeConfig:
    """Table shape: {device name: {"fp8" | "16bit": {batch: config fields}}}; the largest batch <= num_seqs."""
    entries = device_entries(load_table(path), keys).get(fmt, {})
    bucket = max((int(b) for b in entries if int(b) <= num_seqs), default=None)
    return DecodeConfig() if bucket is None else DecodeConfig.from_json(entries[str(bucket)])


def kv_convert(config: DecodeConfig, kv_dtype: torch.dtype, device: torch.device) -> str:
    """The config's FP8 widening where it can run: "asm" is e4m3 PTX, so e5m2 caches and Triton's CPU interpreter
    take "f16" (the same products, Triton's cast)."""
    if config.kv_convert == "asm" and (kv_dtype != torch.float8_e4m3fn or device.type != "cuda"):
        return "f16"
    return config.kv_convert
