"""Weight formats of the linear layers: a ``LinearMethod`` creates, repacks and multiplies one format's weights.

The layers in ``model/linear.py`` own the partitioning (which rows/columns this tensor-parallel rank holds, which
fused shard goes where); a method owns the format (dense ``[out, in]``, GPTQ/AWQ packed int4 + scales, FP8 ...).
Each parameter a method registers carries its layout as attributes, so the layers' ONE weight loader can slice
fused shards and TP shards of any format:

- ``output_dim`` / ``input_dim``: which dim of the parameter runs along the layer's output / input (None: the
  parameter does not follow that dim and is copied whole along it, e.g. a per-tensor scale);
- ``packed_dim`` / ``packed_factor``: values packed ``packed_factor`` to one element along ``packed_dim`` (GPTQ's
  ``qweight`` is ``[in / 8, out]``: input_dim=0, output_dim=1, packed_dim=0, packed_factor=8); offsets along that
  dim are divided by the factor;
- ``weight_loader``: set by the layer after ``create_weights`` unless the method set its own (for layouts the
  attributes cannot describe, e.g. GGUF blocks): ``(param, full_tensor_or_lazy_slice, shard_id)``; it finds this
  rank's part in ``layer.output_shards[shard_id]`` = (offset, size, checkpoint start) in output rows and
  ``layer.input_rank`` (None: the input is not split).

A ``QuantizationConfig`` is built per checkpoint from config.json's ``quantization_config`` (keyed by its
``quant_method``) and hands each layer its method; formats register with ``register_quantization_config``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels._triton import next_power_of_2
from tokenmill.kernels.decode_linear import decode_linear
from tokenmill.kernels.gemv_epilogue import EpilogueNorm, NormSums, PrologueRms

# Layout attributes every parameter of a linear layer carries (see the module docstring).
LAYOUT_ATTRS = ("input_dim", "output_dim", "packed_dim", "packed_factor")


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach layout (and loader) attributes to a parameter; an attribute already set is an error."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise ValueError(f"parameter already has attribute {key!r}; a layout is set once")
        setattr(param, key, value)


@dataclass(frozen=True)
class NormedInput:
    """A linear's input given as the residual stream ``hidden`` whose RMSNorm (``weight``, ``eps``) the linear's
    kernel applies itself (model/llama.py hands it over where ``accepts_normed_input`` says yes).

    With ``sums`` (kernels/gemv_epilogue.py's NormSums, made by the producer's ``apply_add_residual_norm``):
    ``hidden`` already is the stream times ``weight`` and ``sums`` slot ``slot`` holds its rows' sums of squares, so
    the kernel only scales by 1 / rms (``prologue_rms``)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    eps: float
    sums: NormSums | None = None
    slot: int = 0

    def prologue_rms(self) -> PrologueRms:
        """The consumer kernel's 1 / rms scaling of a producer-made input (``sums`` set)."""
        return PrologueRms(self.eps, self.sums, self.slot)

    def made_by(self, residual: torch.Tensor,
                gemv: Callable[[EpilogueNorm], torch.Tensor]) -> tuple[torch.Tensor, NormedInput]:
        """(the stream, this norm's input) from a producer ``gemv`` run with the next-norm epilogue into a new
        tensor shaped as ``residual`` (``apply_add_residual_norm``'s body for every method that has one)."""
        normed = torch.empty_like(residual)
        return gemv(EpilogueNorm(self.weight, normed, self.sums, self.slot)), replace(self, hidden=normed)


class LinearMethod:
    """One weight format; stateless with respect to the layer (all state lives on the layer's parameters)."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        """Register the format's parameters on ``layer``; sizes are this TP rank's partition and ``output_sizes``
        lists the fused shards (e.g. [q, k, v]). Every parameter gets ``set_weight_attrs`` with input_dim,
        output_dim, packed_dim and packed_factor."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Repack the loaded weights for the kernel, once, after the last checkpoint tensor is in."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias) for x [T, input_size] -> [T, sum(output_sizes)]. A method whose ``accepts_fp8_tokens``
        said yes may get x as ``kernels.fp8_quant.Fp8Tokens`` instead; every other method gets plain tensors."""
        raise NotImplementedError

    def accepts_fp8_tokens(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``apply`` would quantize an input of x's rows, device and dtype to e4m3 per token itself, so the
        producer (an RMSNorm or SiLU-and-mul, model/layers.py) may hand it over as ``Fp8Tokens`` made in its own
        pass. x is the producer's input or output: only its row count, device and dtype are read."""
        return False

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | NormedInput,
                           bias: torch.Tensor | None) -> torch.Tensor | None:
        """silu(gate) * up of a fused gate|up layer ([T, sum / 2]) from one kernel whose epilogue applies the
        activation, where the method has one for x's rows and device; None: it has not (the caller runs ``apply``
        and kernels/activation.py's kernel). x may be a NormedInput where ``accepts_normed_input`` said yes."""
        return None

    def accepts_normed_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``apply`` (and ``apply_silu_and_mul``) would take a NormedInput of x's rows, applying the RMSNorm
        in the projection's own kernel; x is the residual stream (only its rows, device and dtype are read)."""
        return False

    def apply_add_residual(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                           residual: torch.Tensor) -> torch.Tensor | None:
        """x W^T (+ bias) + residual, rounded as the RMSNorm kernel's residual add rounds them (the next residual
        stream), from one kernel where the method has one for x's rows; None: it has not."""
        return None

    def accepts_rms_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``apply`` (and ``apply_silu_and_mul``) would take a producer-made NormedInput (with ``sums``) of
        x's rows, only scaling by 1 / rms; a method that applies the whole norm itself takes that too."""
        return self.accepts_normed_input(layer, x)

    def accepts_residual_norm(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether ``apply_add_residual_norm`` would serve an input of x's rows (only rows, device, dtype read)."""
        return False

    def apply_add_residual_norm(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                                residual: torch.Tensor, norm: NormedInput) -> tuple[torch.Tensor, NormedInput] | None:
        """``apply_add_residual``'s stream, plus the next RMSNorm's input made in the same kernel: ``norm`` names
        the norm (weight, eps) and the sums' ring and slot (its ``hidden`` is not read); returns (the stream, a
        NormedInput with ``hidden`` the stream times the weight). None where the method has no such kernel."""
        return None

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the weight for ``input_ids`` (vocabulary-parallel embedding); dense formats only today."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve as an embedding table")

    def tunable_weight(self, layer: nn.Module) -> torch.Tensor | None:
        """The dense ``[out, in]`` weight the start-up GEMM tuner may time against cuBLAS; None: nothing to tune."""
        return None

    def set_weight_layout(self, layout: str) -> None:
        """The device layout asked for (``--quant-weight-layout``), before ``create_weights``; formats with one
        layout ignore it (quantization/weight_layout.py)."""


class DenseLinearMethod(LinearMethod):
    """A plain ``[out, in]`` weight: F.linear, or the Triton GEMV / tiled GEMM where the start-up tuner found one
    faster for this row count (``layer.gemm_plan``, set by runner/linear_tuning.py)."""

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: list[int], params_dtype: torch.dtype
    ) -> None:
        weight = nn.Parameter(torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, "packed_dim": None, "packed_factor": None})
        layer.register_parameter("weight", weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        plan = layer.gemm_plan
        if plan and x.dim() == 2:
            config = plan.get(next_power_of_2(x.shape[0]))
            if config is not None:
                return decode_linear(x, layer.weight, bias, config)
        return F.linear(x, layer.weight, bias)

    def embedding(self, layer: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, layer.weight)

    def tunable_weight(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.weight


class QuantizationConfig:
    """A checkpoint's weight format, from config.json's ``quantization_config``; subclasses register by name."""

    quant_method: ClassVar[str] = ""
    weight_layout: str = "auto"  # --quant-weight-layout, handed to each layer's method (linear_method_for)
    # Engine options the format may honour (set by resolve_quantization; formats without FP8 activations ignore
    # the fusions): vLLM's compilation-config pass_config keys fuse_norm_quant / fuse_act_quant (an RMSNorm / a
    # SiLU-and-mul quantizes its output for the next W8A8 linear), and --quantize-lm-head (vLLM's attribute name).
    fuse_norm_quant: bool = True
    fuse_act_quant: bool = True
    fuse_gemm_act: bool = True  # tokenmill's pass_config key: SiLU-and-mul in the gate|up kernel's epilogue
    fuse_gemm_norm: bool = False  # tokenmill's: residual adds in the GEMVs' epilogues, RMSNorms in their prologues
    lm_head_quantized: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Parse and validate the ``quantization_config`` dict (ValueError with an actionable sentence)."""
        raise NotImplementedError

    @classmethod
    def for_dense_checkpoint(cls) -> QuantizationConfig:
        """The config that quantizes a dense checkpoint at load (``--quantization NAME`` on a bf16 model);
        formats that only read pre-quantized checkpoints keep this default and refuse."""
        online = ", ".join(QUANTIZATION_REGISTRY.online_names()) or "none"
        raise ValueError(f"--quantization {cls.quant_method} needs a checkpoint quantized in that format "
                         f"(config.json quantization_config); to quantize a dense checkpoint at load use one of: "
                         f"{online}")

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        """The method for the layer named ``layer_prefix`` (e.g. ``model.layers.0.self_attn.qkv_proj``); formats
        that leave some layers dense (lm_head, skipped modules) return ``DenseLinearMethod()`` for those."""
        raise NotImplementedError


class QuantizationRegistry:
    """quant_method name -> QuantizationConfig class. Formats shipped in ``tokenmill.quantization`` register on
    import (``quantization/formats.py`` imports them all), so a lookup imports that module (if present) first."""

    def __init__(self, plugin_package: str = "tokenmill.quantization.formats") -> None:
        self._configs: dict[str, type[QuantizationConfig]] = {}
        self._plugin_package = plugin_package
        self._plugins_imported = False

    def register(self, name: str) -> Callable[[type[QuantizationConfig]], type[QuantizationConfig]]:
        def add(cls: type[QuantizationConfig]) -> type[QuantizationConfig]:
            if name in self._configs and self._configs[name] is not cls:
                raise ValueError(f"quantization method {name!r} is registered twice")
            cls.quant_method = name
            self._configs[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        self._import_plugins()
        return sorted(self._configs)

    def online_names(self) -> list[str]:
        """Methods that quantize a dense checkpoint at load (they override ``for_dense_checkpoint``)."""
        self._import_plugins()
        base = QuantizationConfig.for_dense_checkpoint.__func__
        return sorted(n for n, c in self._configs.items() if c.for_dense_checkpoint.__func__ is not base)

    def get(self, name: str) -> type[QuantizationConfig]:
        self._import_plugins()
        if name not in self._configs:
            supported = ", ".join(sorted(self._configs)) or "none (only unquantized checkpoints)"
            raise ValueError(f"quantization method {name!r} is not supported; supported: {supported}")
        return self._configs[name]

    def _import_plugins(self) -> None:
        if not self._plugins_imported:
            self._plugins_imported = True
            if importlib.util.find_spec(self._plugin_package) is not None:
                importlib.import_module(self._plugin_package)


# The one registry of weight formats (a lazy plugin map, like model/registry.py's architecture map).
QUANTIZATION_REGISTRY = QuantizationRegistry()
register_quantization_config = QUANTIZATION_REGISTRY.register


def quantization_config_from_hf(hf_quant_config: dict[str, Any] | None) -> QuantizationConfig | None:
    """The checkpoint's format from config.json's ``quantization_config``; None for a dense checkpoint."""
    if not hf_quant_config:
        return None
    name = hf_quant_config.get("quant_method")
    if not isinstance(name, str):
        raise ValueError("config.json's quantization_config has no quant_method; cannot tell the weight format")
    return QUANTIZATION_REGISTRY.get(name.lower()).from_config(hf_quant_config)


# Formats whose LM head ``--quantize-lm-head`` quantizes at load (the checkpoint's head is dense in all of them).
LM_HEAD_QUANTIZABLE = ("fp8", "rtn4", "int8")


def resolve_quantization(
    checkpoint: QuantizationConfig | None, requested: str | None, weight_layout: str = "auto",
    fuse_norm_quant: bool = True, fuse_act_quant: bool = True, quantize_lm_head: bool = False,
    fuse_gemm_act: bool = True, fuse_gemm_norm: bool = False,
) -> QuantizationConfig | None:
    """The format to serve: the checkpoint's own (config.json / GGUF), checked against ``--quantization`` when
    given, or, for a dense checkpoint, the requested method quantizing at load (vLLM's ``--quantization``);
    ``weight_layout`` (``--quant-weight-layout``), the FP8 input fusions and ``quantize_lm_head`` go with it."""
    config = _resolve_format(checkpoint, requested)
    if config is None:
        if weight_layout == "kmajor":
            raise ValueError("--quant-weight-layout kmajor applies to 4-bit weight-only formats (gptq, awq, "
                             "compressed-tensors, rtn4); this model is served dense: add --quantization rtn4 or "
                             "drop the flag")
        if quantize_lm_head:
            raise ValueError("--quantize-lm-head applies to models quantized at load or FP8 checkpoints "
                             f"({', '.join(LM_HEAD_QUANTIZABLE)}); this model is served dense: add --quantization "
                             "fp8 (or rtn4, int8) or drop the flag")
        return None
    if quantize_lm_head and config.quant_method not in LM_HEAD_QUANTIZABLE:
        raise ValueError(f"--quantize-lm-head is supported for {', '.join(LM_HEAD_QUANTIZABLE)}; this model is "
                         f"served as {config.quant_method!r}: drop the flag")
    config.weight_layout = weight_layout
    config.fuse_norm_quant, config.fuse_act_quant = fuse_norm_quant, fuse_act_quant
    config.fuse_gemm_act, config.fuse_gemm_norm = fuse_gemm_act, fuse_gemm_norm
    config.lm_head_quantized = config.lm_head_quantized or quantize_lm_head  # or the checkpoint's (GPTQ lm_head)
    return config


def _resolve_format(checkpoint: QuantizationConfig | None, requested: str | None) -> QuantizationConfig | None:
    if requested is None:
        return checkpoint
    cls = QUANTIZATION_REGISTRY.get(requested.lower())
    if checkpoint is None:
        return cls.for_dense_checkpoint()
    if checkpoint.quant_method != cls.quant_method:
        raise ValueError(f"--quantization {requested} does not match the checkpoint, which is quantized as "
                         f"{checkpoint.quant_method!r}; drop --quantization (the format is read from the "
                         f"checkpoint) or pass --quantization {checkpoint.quant_method}")
    return checkpoint


def linear_method_for(quant_config: QuantizationConfig | None, layer_prefix: str) -> LinearMethod:
    if quant_config is None:
        return DenseLinearMethod()
    method = quant_config.get_linear_method(layer_prefix)
    method.set_weight_layout(quant_config.weight_layout)
    return method
