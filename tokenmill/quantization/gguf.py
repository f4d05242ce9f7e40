"""GGUF Q4_0 / Q4_1 / Q8_0 linears kept in low bits: each llama.cpp block of 32 weights is repacked at load into
the W4A16 / W8A16 kernel layout (kernels/wna16_gemm.py) with group size 32, instead of dequantized to floats.

- Q4_0 (18 bytes: fp16 d, 16 bytes of nibbles): w = (q - 8) d -> codes q, scale d, symmetric (zero 8).
- Q4_1 (20 bytes: fp16 d, fp16 m, nibbles): w = q d + m -> codes q, scale d, float zero -m / d (fp32; a block
  with d == 0 holds the constant m: scale m, zero -1, codes 0).
- Q8_0 (34 bytes: fp16 d, 32 int8): w = q d -> codes q + 128, scale d, symmetric (zero 128).
Nibble j of a Q4 block's byte i is element i + 16 j. Scales stay fp16 (the file's values), zeros fp32 (so the
zero is not rounded to bf16). Other GGUF types (K-quants, F16, ...) are dequantized as before; a fused layer
(q/k/v, gate/up) stays packed only when its parts share one supported type.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tokenmill.kernels.wna16_gemm import PackedWeight
from tokenmill.model.linear_method import (
    DenseLinearMethod,
    LinearMethod,
    QuantizationConfig,
    register_quantization_config,
    set_weight_attrs,
)
from tokenmill.quantization.linear_methods import FUSED_MODULES, WNA16LinearMethod, _check_sizes, _int_param
from tokenmill.quantization.packing import pack_along

BLOCK = 32  # weights per llama.cpp block (the group size of the repacked layout)
# type name -> (bits, bytes per block, has a min)
PACKED_TYPES = {"Q4_0": (4, 18, False), "Q4_1": (4, 20, True), "Q8_0": (8, 34, False)}


def _fp16(columns: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float32 (the block's fp16 field)."""
    return np.ascontiguousarray(columns).view(np.float16)[..., 0].astype(np.float32)


def gguf_block_codes(raw: np.ndarray, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's bytes [rows, blocks * block bytes] -> codes uint8 [rows, cols], scales fp16
    [rows, blocks], zeros fp32 [rows, blocks] (None: symmetric) with w = (code - zero) * scale."""
    bits, size, has_min = PACKED_TYPES[type_name]
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, size)
    scale = _fp16(blocks[..., :2])
    zero = None
    if bits == 8:
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        nibbles = blocks[..., 4:] if has_min else blocks[..., 2:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    if has_min:
        minimum = _fp16(blocks[..., 2:4])
        constant = scale == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(constant, -1.0, -minimum / scale).astype(np.float32)
        scale = np.where(constant, minimum, scale)
        codes = np.where(constant[..., None], 0, codes).astype(np.uint8)
    codes_t = torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1)))
    scale_t = torch.from_numpy(np.ascontiguousarray(scale)).to(torch.float16)
    return codes_t, scale_t, None if zero is None else torch.from_numpy(np.ascontiguousarray(zero))


def kernel_layout(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bits: int) -> dict[str, torch.Tensor]:
    """Row-major [out, ...] block data -> the tensors GGUFLinearMethod loads (qweight packed along the input)."""
    tensors = {"qweight": pack_along(codes.t(), bits, dim=0), "scales": scales.t().contiguous()}
    if zeros is not None:
        tensors["zeros"] = zeros.t().contiguous()
    return tensors


class GGUFLinearMethod(WNA16LinearMethod):
    """Loads the repacked block data (``kernel_layout``) straight into the kernel layout: no repack after load."""

    def __init__(self, type_name: str) -> None:
        bits, _, has_min = PACKED_TYPES[type_name]
        super().__init__(bits, BLOCK)
        self.type_name, self.has_min = type_name, has_min

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        per_word = 32 // self.bits
        groups = _check_sizes(input_size, output_sizes, BLOCK, 1, f"GGUF {self.type_name}")
        out = sum(output_sizes)
        params = {
            "qweight": _int_param(input_size // per_word, out),
            "scales": nn.Parameter(torch.empty(groups, out, dtype=torch.float16), requires_grad=False),
        }
        if self.has_min:
            params["zeros"] = nn.Parameter(torch.empty(groups, out, dtype=torch.float32), requires_grad=False)
        for name, param in params.items():
            packed = name == "qweight"
            set_weight_attrs(param, {"input_dim": 0, "output_dim": 1, "packed_dim": 0 if packed else None,
                                     "packed_factor": per_word if packed else None})
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        zeros = layer.zeros.data if self.has_min else None
        layer.register_buffer("wna16_perm", None, persistent=False)
        layer.wna16 = PackedWeight(layer.qweight.data, layer.scales.data, zeros, self.bits, BLOCK)


@register_quantization_config("gguf")
class GGUFConfig(QuantizationConfig):
    """Which linears of a GGUF file stay packed: ``module_types`` maps HF module names (``model.layers.0.
    self_attn.q_proj``) to their GGUF type name; a layer is packed when all its parts share a PACKED_TYPES type."""

    def __init__(self, module_types: dict[str, str]) -> None:
        self.module_types = module_types

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GGUFConfig:
        raise ValueError("quant_method 'gguf' is read from .gguf files, not from config.json; pass the .gguf file")

    def _layer_type(self, parent: str, leaf: str) -> str | None:
        types = {self.module_types.get(f"{parent}.{m}") for m in FUSED_MODULES.get(leaf, (leaf,))}
        found = types.pop() if len(types) == 1 else None
        return found if found in PACKED_TYPES else None

    def packed_type(self, module: str) -> str | None:
        """The type a checkpoint module is loaded packed as (None: dequantized), decided per fused layer."""
        parent, _, leaf = module.rpartition(".")
        fused = next((f for f, parts in FUSED_MODULES.items() if leaf in parts), leaf)
        return self._layer_type(parent, fused) if ".layers." in module else None

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        parent, _, leaf = layer_prefix.rpartition(".")
        found = self._layer_type(parent, leaf) if ".layers." in layer_prefix else None
        return DenseLinearMethod() if found is None else GGUFLinearMethod(found)
