"""Quantize a dense checkpoint at load (``--quantization rtn4 | int8``, vLLM-style online quantization).

The layers load their dense ``[out, in]`` weights as usual (HF checkpoint or random preset); once the last shard
is in, ``process_weights_after_loading`` rounds each weight to nearest (symmetric, group-wise over the input)
and keeps only the packed codes + scales in the W4A16 / W8A16 kernel layout. Any model can then be tried
quantized in one flag, and the random-weight presets benchmarked quantized (speed does not depend on values).
The dense copy lives only during loading: peak memory while loading is the dense model's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tokenmill.model.linear_method import (
    DenseLinearMethod,
    LinearMethod,
    QuantizationConfig,
    register_quantization_config,
)
from tokenmill.quantization.linear_methods import WNA16LinearMethod
from tokenmill.quantization.packing import rtn_quantize


class RTNOnlineLinearMethod(WNA16LinearMethod):
    """A dense weight while loading, symmetric round-to-nearest codes after (zero 2^(bits-1), no zeros tensor)."""

    checkpoint_params = ("weight",)

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype) -> None:
        # A row narrower than one group is one group (tiny test models); otherwise groups must tile the row.
        group = input_size if self.group_size == -1 else min(self.group_size, input_size)
        if input_size % group or input_size % (32 // self.bits):
            raise ValueError(f"--quantization with group size {group}: input width {input_size} (this rank's part) "
                             f"is not a multiple of it; use another tensor_parallel_size or int8 (one group)")
        self.group_size = group
        DenseLinearMethod().create_weights(layer, input_size, output_sizes, params_dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data
        quantized = rtn_quantize(weight, self.bits, self.group_size, sym=True)
        codes = quantized.codes.t()  # [K, N], the kernel's orientation
        self._finish(layer, codes, quantized.scales.to(weight.dtype), None, None)


class _RTNOnlineConfig(QuantizationConfig):
    bits: int = 4
    group_size: int = 128

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        raise ValueError(f"quant_method {cls.quant_method!r} quantizes at load and is never written to a "
                         f"checkpoint; serve this directory with --quantization {cls.quant_method} on its dense "
                         f"weights, or write a GPTQ/AWQ checkpoint with `tokenmill quantize`")

    @classmethod
    def for_dense_checkpoint(cls) -> QuantizationConfig:
        return cls()

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        if layer_prefix == "lm_head" and self.lm_head_quantized:
            # --quantize-lm-head (vLLM's GPTQ lm_head_quantized): the head's vocabulary rows rounded like any linear
            return RTNOnlineLinearMethod(self.bits, self.group_size)
        if layer_prefix in ("lm_head", "model.embed_tokens"):
            return DenseLinearMethod()
        return RTNOnlineLinearMethod(self.bits, self.group_size)


@register_quantization_config("rtn4")
class RTN4OnlineConfig(_RTNOnlineConfig):
    """W4A16, group 128 (the GPTQ/AWQ default group): the quick look at a 4-bit model's speed and quality."""

    bits, group_size = 4, 128


@register_quantization_config("int8")
class Int8OnlineConfig(_RTNOnlineConfig):
    """W8A16, one scale per output channel: near-lossless, half the bf16 weight bytes."""

    bits, group_size = 8, -1
