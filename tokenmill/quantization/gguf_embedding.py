"""A GGUF Q8_0 token table (the embedding, and the LM head when tied) on CPU: the embedding lookup stays dense in
the model's dtype, and a one-row LM head (batch-1 decode) multiplies the file's own 8-bit codes through PyTorch's
int4 CPU kernel (kernels/wna16_cpu.py ``prepare_q8_blocks``), at half the bytes of a bf16 table.

The table loads in fp32 (the GGUF reader's dequantized d * q, exact), so the codes and scales are recovered
exactly once loaded (``q8_blocks`` checks it), then the table is cast to the model's dtype. On CUDA, for fp32
models, or where the recovery does not hold, this is the dense method.

bf16 logits are 1/8 apart near 25, so two tokens often round to one value (the dense bf16 head has the same ties and
breaks them by luck). The ``REFINED`` largest logits are therefore recomputed in fp32 from the exact codes and
scales, and the row comes back in fp32: the argmax is the fp32 table's argmax for this hidden state.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.kernels.wna16_cpu import CPUWeight, cpu_linear, prepare_q8_blocks, q8_blocks
from tokenmill.model.linear_method import DenseLinearMethod

REFINED = 32  # candidates recomputed in fp32; the kernel's error (bf16 scales and output) is far below their spread


class Q8Table:
    """The table's 8-bit form on CPU: the int4-pair kernel weight, and the codes/scales for the fp32 refinement."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, kernel: CPUWeight) -> None:
        self.codes, self.scales, self.kernel = codes, scales, kernel  # int8 [N, K], fp32 [N, K / 32]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, K] bf16 -> fp32 [1, N]: the kernel's row with its largest ``REFINED`` entries made exact."""
        out = cpu_linear(x, self.kernel).float()
        top = out[0].topk(REFINED).indices
        rows = self.codes.index_select(0, top).float().view(REFINED, self.scales.shape[1], -1)
        rows = (rows * self.scales.index_select(0, top)[..., None]).view(REFINED, -1)
        out[0, top] = rows @ x[0].float()
        return out


class GGUFQ8TableMethod(DenseLinearMethod):
    """Dense rows for the lookup; the CPU 8-bit copy rides on the weight parameter (a tied LM head shares it)."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        on_cpu = torch.empty(0).device.type == "cpu"  # the device the model is built on
        load_dtype = torch.float32 if on_cpu and params_dtype == torch.bfloat16 else params_dtype  # the kernel's dtype
        super().create_weights(layer, input_size, output_sizes, load_dtype)
        layer.q8_table_dtype = params_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        dtype = layer.q8_table_dtype
        if weight.dtype == dtype:
            return
        found = q8_blocks(weight.data)
        kernel = None if found is None else prepare_q8_blocks(*found)
        weight.q8_cpu = None if kernel is None or weight.shape[0] < REFINED else Q8Table(*found, kernel)
        weight.data = weight.data.to(dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q8: Q8Table | None = getattr(layer.weight, "q8_cpu", None)
        if q8 is not None and x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.bfloat16 and bias is None:
            return q8.logits(x)
        return super().apply(layer, x, bias)
