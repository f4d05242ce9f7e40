"""FP8 W8A8 weights (e4m3): quant_method "fp8" checkpoints (vLLM / HF ``FP8Config``: per-tensor weight scales,
dynamic or static activation scales) and ``--quantization fp8``, which quantizes a dense checkpoint at load.

Weights are e4m3 ``[out, in]`` with one fp32 scale per output channel (a checkpoint's per-tensor scale is
copied to every row of its fused shard, which is exact). Activations are quantized per token on the fly
(kernels/fp8_quant.py) or divided by the checkpoint's static scale; the GEMM is ``torch._scaled_mm`` with
row-wise scales on sm89+ GPUs, and dequantize + matmul in fp32 on CPU (emulated, so tests run anywhere). Decode
batches of up to 16 rows on CUDA take an FP8-weight GEMV instead (kernels/fp8_gemv.py, or kernels/fp8_stream.py
where kernels/quant_dispatch.py picks it: weights upcast in registers, activations left in bf16), which streams
the halved weight bytes at a higher rate. Where the layer would quantize its input per token itself, it says so
(``accepts_fp8_tokens``) and its producer hands it ``Fp8Tokens`` made in the producer's own pass (model/layers.py).

``--quantize-lm-head`` (off by default, as vLLM keeps lm_head unquantized) serves the LM head the same way: its dense
weight rounded to e4m3 per vocabulary row at load, logits from the FP8 product.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.fp8_gemv import fp8_gemv
from tokenmill.kernels.fp8_quant import (
    FP8_E4M3,
    Fp8Tokens,
    quantize_fp8,
    quantize_fp8_per_token,
    quantize_fp8_static,
)
from tokenmill.kernels.fp8_stream import Fp8StreamConfig, fp8_stream_gemv
from tokenmill.kernels.gemv_epilogue import RING_ROWS
from tokenmill.kernels.quant_dispatch import Fp8Choice, fp8_rows_config
from tokenmill.kernels.splitk import splitk_workspace
from tokenmill.model.linear_method import (
    DenseLinearMethod,
    LinearMethod,
    NormedInput,
    QuantizationConfig,
    register_quantization_config,
    set_weight_attrs,
)

# A fused layer of ours -> the checkpoint modules it is built from (ignore lists name those).
_FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_fp8_gpu(device: torch.device) -> None:
    """FP8 GEMMs need sm89+ (Ada, Hopper); ValueError with the way out elsewhere."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"FP8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: serve the dense checkpoint, or "
                         f"use --quantization int8 (W8A16)")


def fp8_linear(
    x: torch.Tensor | Fp8Tokens, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] times (weight [N, K] e4m3 * weight_scale [N])^T (+ bias), x quantized to e4m3 first: per token
    (dynamic, ``input_scale`` None) or by the static per-tensor ``input_scale``; ``Fp8Tokens`` [T, K] come
    quantized per token already."""
    if isinstance(x, Fp8Tokens):
        shape, dtype = x.values.shape, x.dtype
        xq, x_scale = x.values, x.scales
    else:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if input_scale is None:
            xq, x_scale = quantize_fp8_per_token(x2)
        else:
            xq = quantize_fp8_static(x2, input_scale)
            x_scale = input_scale.reshape(1, 1).expand(x2.shape[0], 1)
    if xq.is_cuda:
        # Row-wise scaled GEMM (one scale per row of x, one per column of W^T): cuBLASLt FP8 on Hopper; its
        # row-wise mode writes bf16. W^T is the column-major view of the [N, K] weight, as it requires.
        out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale.contiguous(), scale_b=weight_scale.view(1, -1),
                               out_dtype=torch.bfloat16)
    else:  # emulated: exactly the dequantized operands multiplied in fp32
        out = (xq.float() * x_scale) @ (weight.float() * weight_scale.view(-1, 1)).t()
    out = out.to(dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*shape[:-1], weight.shape[0])


class _ChannelScaleLoader:
    """Per-output-channel scales [N] from a checkpoint's per-tensor scale (one per fused shard: shape (), [1],
    [1, 1]) or per-channel ones ([n] or [n, 1]), written to this rank's rows of the shard."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        offset, length, start = self.layer.output_shards[shard_id]
        rows = param.data.narrow(0, offset, length)
        if math.prod(loaded.shape) == 1:
            value = loaded if isinstance(loaded, torch.Tensor) else loaded.narrow(0, 0, 1)
            rows.fill_(value.reshape(()).float().item())
            return
        if loaded.shape[0] < start + length or math.prod(loaded.shape[1:]) != 1:
            raise ValueError(f"weight_scale of shape {tuple(loaded.shape)} is neither per tensor nor per output "
                             f"channel of this layer's {length} rows from {start}")
        rows.copy_(loaded.narrow(0, start, length).reshape(length).float())


def _load_max_input_scale(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    """Static input scales: fused q/k/v (gate/up) read one input, so they share the largest of their scales."""
    value = loaded if isinstance(loaded, torch.Tensor) else loaded.narrow(0, 0, loaded.shape[0])
    if value.numel() != 1:
        raise ValueError(f"input_scale must be one value per layer (static per-tensor); got {tuple(value.shape)}")
    param.data.copy_(torch.maximum(param.data, value.reshape(()).float().to(param.device)))


class Fp8LinearMethod(LinearMethod):
    """e4m3 weight [out, in] + fp32 ``weight_scale`` [out]; ``input_scale`` () when activations are static.

    ``serialized`` False: the layer loads a dense weight and quantizes it per output channel once loaded.
    """

    def __init__(self, serialized: bool, static_input: bool) -> None:
        self.serialized = serialized
        self.static_input = static_input

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        if not self.serialized:
            DenseLinearMethod().create_weights(layer, input_size, output_sizes, params_dtype)
            return
        out = sum(output_sizes)
        weight = nn.Parameter(torch.empty(out, input_size, dtype=FP8_E4M3), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "packed_dim": None, "packed_factor": None})
        layer.register_parameter("weight", weight)
        scale = nn.Parameter(torch.empty(out, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(scale, {"input_dim": None, "output_dim": 0, "packed_dim": None, "packed_factor": None,
                                 "weight_loader": _ChannelScaleLoader(layer)})
        layer.register_parameter("weight_scale", scale)
        if self.static_input:
            input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
            set_weight_attrs(input_scale, {"input_dim": None, "output_dim": None, "packed_dim": None,
                                           "packed_factor": None, "weight_loader": _load_max_input_scale})
            layer.register_parameter("input_scale", input_scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_fp8_gpu(layer.weight.device)
        if layer.weight.is_cuda and HAS_TRITON:  # the GEMV's split-K workspace, made before any graph capture
            splitk_workspace(layer.weight.device)
        if not self.serialized:  # quantize the dense weight once: one scale per output channel
            quantized, scales = quantize_fp8(layer.weight.data, dim=1)
            del layer.weight
            layer.register_parameter("weight", nn.Parameter(quantized, requires_grad=False))
            layer.register_parameter("weight_scale", nn.Parameter(scales.view(-1), requires_grad=False))
        if self.static_input and not bool((layer.input_scale.data > 0).item()):
            raise ValueError("a static FP8 input_scale is zero or missing; the checkpoint's activation scales "
                             "did not load")

    def gemv_choice(self, layer: nn.Module, rows: int, device: torch.device, dtype: torch.dtype) -> Fp8Choice:
        """The FP8-weight GEMV for ``rows`` bf16/fp16 rows on CUDA (kernels/quant_dispatch.py), or None where
        the input is quantized and multiplied by ``torch._scaled_mm`` (or emulated off CUDA)."""
        if device.type != "cuda" or not HAS_TRITON or dtype not in (torch.bfloat16, torch.float16):
            return None
        return fp8_rows_config(rows, layer.weight.shape[0], layer.weight.shape[1], device,
                               getattr(layer, "gemm_plan", None))

    def accepts_fp8_tokens(self, layer: nn.Module, x: torch.Tensor) -> bool:
        # Dynamic scales only (a static scale is the checkpoint's, not the row's), and not where the GEMV reads
        # the activations in bf16 (decode batches of up to 16 rows).
        rows = math.prod(x.shape[:-1])
        return not self.static_input and self.gemv_choice(layer, rows, x.device, x.dtype) is None

    def _fma_config(self, layer: nn.Module, x: torch.Tensor) -> Fp8StreamConfig | None:
        """The ``fma`` stream GEMV config x's rows get (the kind with the epilogues), or None."""
        config = self.gemv_choice(layer, math.prod(x.shape[:-1]), x.device, x.dtype)
        return config if isinstance(config, Fp8StreamConfig) and config.kind == "fma" else None

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | NormedInput,
                           bias: torch.Tensor | None) -> torch.Tensor | None:
        """The FP8 stream GEMV's SiLU-and-mul epilogue (``fma`` kind: the 1-8 row decode batches it serves)."""
        if isinstance(x, NormedInput):  # accepts_rms_input said yes
            return self._rms_gemv(layer, x, bias, act_mul=True)
        config = self._fma_config(layer, x)
        if config is None or config.block_n < 2:
            return None
        out = fp8_stream_gemv(x.reshape(-1, x.shape[-1]), layer.weight, layer.weight_scale, config, bias, act_mul=True)
        return out.reshape(*x.shape[:-1], layer.weight.shape[0] // 2)

    def _ring_config(self, layer: nn.Module, x: torch.Tensor) -> Fp8StreamConfig | None:
        """The ``fma`` config of rows the norm ring holds (2-D x, at most RING_ROWS rows), or None."""
        return self._fma_config(layer, x) if x.dim() == 2 and x.shape[0] <= RING_ROWS else None

    def accepts_rms_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        # the producer-made norm input only (its kernel has no norm prologue of its own)
        config = self._ring_config(layer, x)
        return config is not None and config.block_n >= 2

    def accepts_residual_norm(self, layer: nn.Module, x: torch.Tensor) -> bool:
        return self._ring_config(layer, x) is not None

    def apply_add_residual_norm(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                                residual: torch.Tensor, norm: NormedInput) -> tuple[torch.Tensor, NormedInput] | None:
        """The FP8 ``fma`` GEMV's next-norm epilogue (kernels/gemv_epilogue.py ``EpilogueNorm``)."""
        config = self._ring_config(layer, x)
        if config is None:
            return None
        return norm.made_by(residual, lambda next_norm: fp8_stream_gemv(
            x, layer.weight, layer.weight_scale, config, bias, residual=residual, next_norm=next_norm))

    def _rms_gemv(self, layer: nn.Module, x: NormedInput, bias: torch.Tensor | None,
                  act_mul: bool = False) -> torch.Tensor:
        config = self._ring_config(layer, x.hidden)
        if x.sums is None or config is None or config.block_n < 2:  # accepts_rms_input said no: a caller bug
            raise ValueError("the FP8 GEMV takes only a producer-made norm input (NormedInput with sums) of rows it "
                             "serves with the fma kind")
        return fp8_stream_gemv(x.hidden, layer.weight, layer.weight_scale, config, bias, act_mul=act_mul,
                               rms=x.prologue_rms())

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Tokens | NormedInput,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, NormedInput):
            return self._rms_gemv(layer, x, bias)
        if isinstance(x, Fp8Tokens):
            return fp8_linear(x, layer.weight, layer.weight_scale, bias)
        config = self.gemv_choice(layer, math.prod(x.shape[:-1]), x.device, x.dtype)
        if config is not None:
            # Few rows: the FP8-weight GEMV (bf16 activations, no activation quantization) streams the weight
            # faster than torch._scaled_mm.
            x2 = x.reshape(-1, x.shape[-1])
            if isinstance(config, Fp8StreamConfig):
                out = fp8_stream_gemv(x2, layer.weight, layer.weight_scale, config, bias)
            else:
                out = fp8_gemv(x2, layer.weight, layer.weight_scale, bias, config)
            return out.reshape(*x.shape[:-1], layer.weight.shape[0])
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, layer.input_scale if self.static_input else None)


def _skipped(layer_prefix: str, ignored: list[str]) -> bool:
    """Whether a layer (or any checkpoint module fused into it) is in the checkpoint's ignore list."""
    parent, _, leaf = layer_prefix.rpartition(".")
    names = [f"{parent}.{m}" if parent else m for m in _FUSED_PARTS.get(leaf, (leaf,))]
    return any(entry and (n == entry or n.endswith("." + entry)) for n in names for entry in ignored)


@register_quantization_config("fp8")
class Fp8Config(QuantizationConfig):
    """vLLM's ``fp8`` quant_method: a checkpoint of e4m3 weights + ``weight_scale`` (and ``input_scale`` when
    ``activation_scheme`` is static), or, through ``--quantization fp8``, a dense checkpoint quantized at load."""

    def __init__(self, serialized: bool, activation_scheme: str, ignored_layers: list[str]) -> None:
        self.serialized = serialized
        self.activation_scheme = activation_scheme
        self.ignored_layers = ignored_layers

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        scheme = config.get("activation_scheme", "dynamic")
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"FP8 activation_scheme {scheme!r} is not supported; supported: dynamic, static")
        if config.get("weight_block_size"):
            raise ValueError("block-wise FP8 checkpoints (weight_block_size, DeepSeek-style) are not supported; "
                             "supported: per-tensor or per-channel weight scales")
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"FP8 weight format {fmt!r} is not supported; supported: e4m3")
        ignored = list(config.get("ignored_layers") or config.get("modules_to_not_convert") or [])
        return cls(True, scheme, ignored)

    @classmethod
    def for_dense_checkpoint(cls) -> Fp8Config:
        return cls(False, "dynamic", [])

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        if layer_prefix == "lm_head" and self.lm_head_quantized:
            # checkpoints store lm_head dense (vLLM's too): quantized at load, per vocabulary row, dynamic input
            return Fp8LinearMethod(serialized=False, static_input=False)
        if layer_prefix in ("lm_head", "model.embed_tokens") or _skipped(layer_prefix, self.ignored_layers):
            return DenseLinearMethod()
        return Fp8LinearMethod(self.serialized, self.activation_scheme == "static")
