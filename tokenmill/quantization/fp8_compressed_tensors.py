"""compressed-tensors ``float-quantized`` FP8 checkpoints (llm-compressor's FP8 / FP8_DYNAMIC schemes): the
scheme the compressed-tensors dispatcher (quantization/compressed_tensors.py) picks for 8-bit float weights.

Tensors per linear: ``weight`` e4m3 [out, in], ``weight_scale`` [out, 1] (channel) or [1] (tensor), and
``input_scale`` [1] for static activations; served by the same ``Fp8LinearMethod`` as quant_method "fp8".
"""

from __future__ import annotations

from typing import Any

from tokenmill.model.linear_method import LinearMethod
from tokenmill.quantization.compressed_tensors import register_compressed_tensors_scheme
from tokenmill.quantization.fp8 import Fp8LinearMethod

FLOAT_FORMATS = ("float-quantized", "naive-quantized")


@register_compressed_tensors_scheme
class Fp8FloatScheme:
    description = ("float-quantized FP8 (8-bit float weights, channel or tensor scales; activations dynamic per "
                   "token/tensor, static per tensor, or none)")

    def matches(self, weights: dict[str, Any] | None, input_activations: dict[str, Any] | None, fmt: str) -> bool:
        return bool(weights) and weights.get("type") == "float" and fmt in FLOAT_FORMATS

    def linear_method(self, weights: dict[str, Any], input_activations: dict[str, Any] | None,
                      fmt: str) -> LinearMethod:
        if int(weights.get("num_bits", 8)) != 8 or weights.get("strategy") not in ("channel", "tensor"):
            raise ValueError(f"compressed-tensors float weights {weights} are not supported; supported: 8 bits "
                             f"with strategy channel or tensor")
        if weights.get("dynamic") or weights.get("symmetric") is False:
            raise ValueError("compressed-tensors FP8 weights must be static and symmetric")
        if input_activations is None:
            # FP8 weights only (W8A16 in the checkpoint): served W8A8 with dynamic per-token activations, which
            # is what makes FP8 weights fast on Hopper; the extra activation rounding is ~e4m3's 2^-4.
            return Fp8LinearMethod(serialized=True, static_input=False)
        if input_activations.get("type") != "float" or int(input_activations.get("num_bits", 8)) != 8:
            raise ValueError(f"compressed-tensors FP8 input activations {input_activations} are not supported; "
                             f"supported: 8-bit float")
        strategy, dynamic = input_activations.get("strategy"), bool(input_activations.get("dynamic"))
        if dynamic and strategy in ("token", "tensor"):  # per token is at least as fine as per tensor
            return Fp8LinearMethod(serialized=True, static_input=False)
        if not dynamic and strategy == "tensor":
            return Fp8LinearMethod(serialized=True, static_input=True)
        raise ValueError(f"compressed-tensors FP8 activation strategy {strategy!r} (dynamic={dynamic}) is not "
                         f"supported; supported: dynamic token/tensor, static tensor")
