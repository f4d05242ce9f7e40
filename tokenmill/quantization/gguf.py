"""GGUF linears kept in low bits: each Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K tensor is repacked at load into the
W4A16 / W8A16 kernel layout (kernels/wna16_gemm.py; the per-type mapping is in gguf_blocks.py) instead of
dequantized to floats, and loaded through the layers' one partition loader, so fused q/k/v and gate/up shards and
tensor-parallel slices (column: output rows; row: input columns on group boundaries) work as for GPTQ.
Other GGUF types (F16, Q2_K, Q3_K, IQ*, ...) are dequantized as before; a fused layer stays packed only when its
parts share one supported type.
"""

from __future__ import annotations

from typing import Any

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
from tokenmill.quantization.gguf_blocks import PACKED_TYPES, gguf_block_codes
from tokenmill.quantization.linear_methods import FUSED_MODULES, WNA16LinearMethod, _int_param
from tokenmill.quantization.packing import pack_along

__all__ = ["PACKED_TYPES", "GGUFConfig", "GGUFLinearMethod", "gguf_block_codes", "kernel_layout"]


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
        self.block_type = PACKED_TYPES[type_name]
        super().__init__(self.block_type.bits, self.block_type.group_size)
        self.type_name, self.has_min = type_name, self.block_type.has_zeros

    def set_weight_layout(self, layout: str) -> None:
        # GGUF blocks load straight into the GPTQ layout (scales in their own dtype); no K-major repack yet
        if layout == "kmajor":
            raise ValueError(f"--quant-weight-layout kmajor does not serve GGUF {self.type_name} weights yet; "
                             f"use auto or gptq")

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        per_word = 32 // self.bits
        groups = self._groups(layer, input_size)
        out = sum(output_sizes)
        params = {
            "qweight": _int_param(input_size // per_word, out),
            "scales": nn.Parameter(torch.empty(groups, out, dtype=self.block_type.scale_dtype), requires_grad=False),
        }
        if self.has_min:
            params["zeros"] = nn.Parameter(torch.empty(groups, out, dtype=torch.float32), requires_grad=False)
        for name, param in params.items():
            packed = name == "qweight"
            set_weight_attrs(param, {"input_dim": 0, "output_dim": 1, "packed_dim": 0 if packed else None,
                                     "packed_factor": per_word if packed else None})
            layer.register_parameter(name, param)

    def _groups(self, layer: nn.Module, input_size: int) -> int:
        """Groups along this rank's input: a row-parallel split must fall on a group boundary of the repacked
        layout (32 weights, 16 for Q6_K; a K-quant's 256-weight block need not stay whole)."""
        if input_size % self.group_size == 0:
            return input_size // self.group_size
        ranks = layer.parallel.world_size if getattr(layer, "input_rank", None) is not None else 1
        split = f" (its {input_size * ranks} input columns split over {ranks} ranks)" if ranks > 1 else ""
        raise ValueError(f"GGUF {self.type_name}: input width {input_size}{split} is not a multiple of the "
                         f"{self.type_name} group of {self.group_size} weights; use a tensor_parallel_size that "
                         f"splits it on group boundaries")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        zeros = layer.zeros.data if self.has_min else None
        layer.register_buffer("wna16_perm", None, persistent=False)
        layer.wna16 = PackedWeight(layer.qweight.data, layer.scales.data, zeros, self.bits, self.group_size)


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
        # The table that computes the logits (the embedding when the head is tied: the file has no lm_head), if Q8_0.
        head = "lm_head" if "lm_head" in self.module_types else "model.embed_tokens"
        if layer_prefix == head and self.module_types.get(layer_prefix) == "Q8_0":
            from tokenmill.quantization.gguf_embedding import GGUFQ8TableMethod

            return GGUFQ8TableMethod()  # dense, plus the file's 8-bit codes for a one-row LM head on CPU
        parent, _, leaf = layer_prefix.rpartition(".")
        found = self._layer_type(parent, leaf) if ".layers." in layer_prefix else None
        return DenseLinearMethod() if found is None else GGUFLinearMethod(found)
