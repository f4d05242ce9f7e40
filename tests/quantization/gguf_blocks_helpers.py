"""Random GGUF block bytes for tests: every byte random (codes, packed 6-bit scales and mins, high bits), the fp16
fields (d, dmin, m) drawn from a sane range so the weights are finite and model-sized, some scales set to 0.
Only numpy and tokenmill at import (the GPU machine has no gguf package)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from tokenmill.kernels.wna16_gemm import PackedWeight, dequantize
from tokenmill.quantization.gguf import PACKED_TYPES, gguf_block_codes, kernel_layout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))  # model_helpers (write_tiny_gguf)

# Byte offsets of each type's fp16 fields in a block: the scale d first, then the min (m / dmin) if any.
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(rng: np.random.Generator, rows: int, cols: int, type_name: str, magnitude: float = 0.05,
                  zero_scale_blocks: int = 2) -> np.ndarray:
    """uint8 [rows, cols / block weights * block bytes] of random blocks whose weights are about ``magnitude``;
    ``zero_scale_blocks`` blocks get d = 0 (constant or all-zero blocks)."""
    kind = PACKED_TYPES[type_name]
    blocks = rng.integers(0, 256, (rows, cols // kind.block_weights, kind.block_bytes), dtype=np.uint8)
    # Largest |code - zero| times the block's scale factor: 8 (Q4_0), 15, 128, 15 * 63, 31 * 63, 32 * 127.
    span = {"Q4_0": 8, "Q4_1": 15, "Q8_0": 128, "Q4_K": 15 * 63, "Q5_K": 31 * 63, "Q6_K": 32 * 127}[type_name]
    for i, offset in enumerate(FP16_FIELDS[type_name]):
        value = rng.uniform(0.2, 1.0, blocks.shape[:2]) * magnitude / span
        if i == 0 and not kind.has_zeros:
            value *= rng.choice([-1.0, 1.0], blocks.shape[:2])
        if i == 1:  # a min: m (Q4_1) or dmin (K-quants) of the same order as the range
            value = rng.uniform(-1.0, 1.0, blocks.shape[:2]) * magnitude / (1 if type_name == "Q4_1" else 63)
        blocks[..., offset:offset + 2] = value.astype(np.float16)[..., None].view(np.uint8)
    flat = blocks.reshape(-1, kind.block_bytes)
    for index in rng.choice(len(flat), size=min(zero_scale_blocks, len(flat)), replace=False):
        flat[index, FP16_FIELDS[type_name][0]:FP16_FIELDS[type_name][0] + 2] = 0
    return blocks.reshape(rows, -1)


def repacked(raw: np.ndarray, type_name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(the kernel-layout tensors our GGUF loader yields for these block bytes, their dense weight [out, in])."""
    kind = PACKED_TYPES[type_name]
    tensors = kernel_layout(*gguf_block_codes(raw, type_name), kind.bits)
    dense = dequantize(PackedWeight(tensors["qweight"], tensors["scales"], tensors.get("zeros"), kind.bits,
                                    kind.group_size)).t()
    return tensors, dense


def random_gguf_linear(rng: np.random.Generator, type_name: str, out_f: int,
                       in_f: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``repacked`` of a random GGUF linear [out_f, in_f]."""
    return repacked(random_blocks(rng, out_f, in_f, type_name), type_name)


# Per-layer GGUF types of the K-quant tiny llama: layer 1's q/k/v mix two types (its fused qkv is dequantized).
K_QUANT_LAYERS = (
    {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q4_K", "o_proj": "Q6_K",
     "gate_proj": "Q5_K", "up_proj": "Q5_K", "down_proj": "Q6_K"},
    {"q_proj": "Q4_K", "k_proj": "Q4_K", "v_proj": "Q6_K", "o_proj": "Q5_K",
     "gate_proj": "Q6_K", "up_proj": "Q6_K", "down_proj": "Q4_K"},
)


def kquant_llama_gguf(hf_dir: Path, path: Path, seed: int = 0) -> Path:
    """The tiny llama's metadata and norms with random K-quant blocks for every linear (types per
    ``K_QUANT_LAYERS``), a Q8_0 embedding quantized from its weights and a Q6_K LM head (both dequantized at
    load). Widths must be multiples of 256 (``tiny_llama_256``)."""
    import gguf
    from model_helpers import write_tiny_gguf

    rng = np.random.default_rng(seed)

    def encode(name: str, array: np.ndarray) -> tuple[np.ndarray, str]:
        if name == "model.embed_tokens.weight":
            return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), "Q8_0"
        if name == "lm_head.weight":
            type_name = "Q6_K"
        else:
            layer, module = name.split(".")[2], name.split(".")[-2]
            type_name = K_QUANT_LAYERS[int(layer)][module]
        # ~0.2 / sqrt(fan-in) keeps the random model's activations in range over two layers
        return random_blocks(rng, *array.shape, type_name, magnitude=4.0 / array.shape[1] ** 0.5), type_name

    return write_tiny_gguf(hf_dir, path, "F32", encode=encode)
