"""GPTQ and AWQ checkpoints served from their packed low-bit weights: ``QuantizationConfig``s registered by
config.json's ``quant_method`` and the ``LinearMethod``s they hand the linear layers (model/linear_method.py).

Both formats load into their checkpoint layout (so the layers' one loader slices fused and tensor-parallel
shards by the parameters' packed dims), then ``process_weights_after_loading`` repacks once into the kernel
layout of kernels/wna16_gemm.py: codes packed along the input dim, float zero points (None when symmetric),
act-order rows sorted by group with the matching input permutation kept for ``apply``. Weights stay 4/8-bit.
With ``--quant-weight-layout kmajor`` (quantization/weight_layout.py) a 4-bit CUDA weight is instead repacked
into kernels/w4_gemv.py's K-major layout only (same bytes), after fusing and sharding, like the GPTQ repack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.quant_dispatch import (
    kmajor_cuda_linear,
    kmajor_cuda_silu_and_mul,
    kmajor_gemv_choice,
    wna16_cuda_linear,
)
from tokenmill.kernels.splitk import splitk_workspace
from tokenmill.kernels.w4_gemv import KMajorWeight, PrologueNorm, W4GemvConfig, k_major_from_codes, w4_gemv
from tokenmill.kernels.wna16_cpu import cpu_linear, cpu_weight
from tokenmill.kernels.wna16_gemm import PackedWeight, wna16_linear_cpu
from tokenmill.model.linear_method import (
    DenseLinearMethod,
    LinearMethod,
    NormedInput,
    QuantizationConfig,
    register_quantization_config,
    set_weight_attrs,
)
from tokenmill.quantization.packing import AWQ_UNPACK_ORDER, pack_along, unpack_along
from tokenmill.quantization.weight_layout import choose_weight_layout

# A fused layer of ours -> the checkpoint modules it is built from (formats that name modules name those).
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _int_param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=torch.int32), requires_grad=False)


def _check_sizes(input_size: int, output_sizes: list[int], group_size: int, per_word: int, what: str) -> int:
    """Groups along the input for this partition; ValueError when the shapes do not fit the format."""
    group = input_size if group_size == -1 else group_size
    if input_size % group or input_size % per_word:
        raise ValueError(f"{what}: input width {input_size} (this rank's part) is not a multiple of the group size "
                         f"{group} and of {per_word}; use another tensor_parallel_size or a checkpoint with a "
                         f"smaller group")
    for size in output_sizes:
        if size % per_word:
            raise ValueError(f"{what}: output width {size} is not a multiple of {per_word} (packed zero points)")
    return input_size // group


class WNA16LinearMethod(LinearMethod):
    """Shared half of the GPTQ / AWQ methods: the matmul on the repacked weight, and where it runs."""

    # Checkpoint-layout parameters (besides GPTQ's names) that ``_finish`` drops once repacked.
    checkpoint_params: tuple[str, ...] = ()

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits = bits
        self.group_size = group_size
        self.weight_layout = "auto"

    def set_weight_layout(self, layout: str) -> None:
        self.weight_layout = layout

    def apply(self, layer: nn.Module, x: torch.Tensor | NormedInput, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, NormedInput):  # accepts_normed_input said yes: the K-major GEMV's norm prologue
            return self._normed_gemv(layer, x, bias)
        packed: PackedWeight | KMajorWeight = layer.wna16
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.wna16_perm is not None:  # act-order: input channels in the order the rows were sorted
            x2 = x2.index_select(1, layer.wna16_perm)
        if isinstance(packed, KMajorWeight):  # chosen only for CUDA + triton + bf16/fp16 (weight_layout.py)
            out = kmajor_cuda_linear(x2, packed, bias, getattr(layer, "gemm_plan", None))
        elif x.is_cuda and HAS_TRITON and x.dtype in (torch.float16, torch.bfloat16):
            out = wna16_cuda_linear(x2, packed, bias, getattr(layer, "gemm_plan", None))
        elif x2.dtype == torch.bfloat16 and cpu_weight(layer) is not None:
            # PyTorch's CPU int4 / int8 kernels: fast for bf16 activations only (fp32 takes a slow reference path)
            out = cpu_linear(x2, layer.wna16_cpu, bias)
        else:
            out = wna16_linear_cpu(x2, packed, bias)
        return out.reshape(*shape[:-1], packed.out_features)

    def apply_silu_and_mul(self, layer: nn.Module, x: torch.Tensor | NormedInput,
                           bias: torch.Tensor | None) -> torch.Tensor | None:
        """The K-major GEMV's SiLU-and-mul epilogue (kernels/w4_gemv.py ``act_mul``) for the rows it serves."""
        if isinstance(x, NormedInput):
            return self._normed_gemv(layer, x, bias, act_mul=True)
        packed = layer.wna16
        if not isinstance(packed, KMajorWeight) or x.dim() != 2:
            return None
        if layer.wna16_perm is not None:
            x = x.index_select(1, layer.wna16_perm)
        return kmajor_cuda_silu_and_mul(x, packed, bias, getattr(layer, "gemm_plan", None))

    def _gemv_config(self, layer: nn.Module, x: torch.Tensor) -> W4GemvConfig | None:
        """The K-major GEMV config x's rows get, or None (a GEMM, the GPTQ layout, act-order: the norm would need
        its weight permuted too, and the residual add is simply not wired for it)."""
        packed = layer.wna16
        if not isinstance(packed, KMajorWeight) or x.dim() != 2 or layer.wna16_perm is not None:
            return None
        return kmajor_gemv_choice(x, packed, getattr(layer, "gemm_plan", None))

    def _normed_gemv(self, layer: nn.Module, x: NormedInput, bias: torch.Tensor | None,
                     act_mul: bool = False) -> torch.Tensor:
        config = self._gemv_config(layer, x.hidden)
        if config is None:  # accepts_normed_input said yes for these rows: a caller bug
            raise ValueError("a NormedInput reached a layer whose rows go to another kernel")
        norm = PrologueNorm(x.weight, x.eps) if x.sums is None else x.prologue_rms()
        return w4_gemv(x.hidden, layer.wna16, config, bias, act_mul=act_mul, norm=norm)

    def accepts_normed_input(self, layer: nn.Module, x: torch.Tensor) -> bool:
        return self._gemv_config(layer, x) is not None

    def apply_add_residual(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                           residual: torch.Tensor) -> torch.Tensor | None:
        config = self._gemv_config(layer, x)
        return None if config is None else w4_gemv(x, layer.wna16, config, bias, residual=residual)

    def accepts_residual_norm(self, layer: nn.Module, x: torch.Tensor) -> bool:
        return self._gemv_config(layer, x) is not None

    def apply_add_residual_norm(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None,
                                residual: torch.Tensor, norm: NormedInput) -> tuple[torch.Tensor, NormedInput] | None:
        """The K-major GEMV's next-norm epilogue (kernels/gemv_epilogue.py ``EpilogueNorm``)."""
        config = self._gemv_config(layer, x)
        if config is None:
            return None
        return norm.made_by(residual, lambda next_norm: w4_gemv(x, layer.wna16, config, bias, residual=residual,
                                                                 next_norm=next_norm))

    def _sort_by_group(self, codes: torch.Tensor, g_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Act-order: codes [K, N] with rows sorted by group (groups become contiguous) and the permutation the
        input columns take in ``apply``; (codes, None) when the groups are already in order."""
        g_idx = g_idx.long()
        if self.group_size == -1:
            return codes, None
        g_idx = g_idx - g_idx.min()  # a row-parallel rank's groups start at its own first group
        trivial = torch.arange(codes.shape[0], device=codes.device) // self.group_size
        if torch.equal(g_idx, trivial):
            return codes, None
        perm = torch.argsort(g_idx, stable=True)
        return codes.index_select(0, perm), perm

    def _finish(self, layer: nn.Module, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                perm: torch.Tensor | None) -> None:
        """Replace the checkpoint-layout parameters by the kernel layout: codes [K, N] packed along K (GPTQ
        layout), or only the K-major repack ([N, K / 8] words, scales / zeros [N, groups]) where chosen."""
        group = codes.shape[0] if self.group_size == -1 else self.group_size
        layer.wna16_layout = choose_weight_layout(self.weight_layout, self.bits, group, scales.dtype, codes.device)
        if layer.wna16_layout.layout == "kmajor":
            kmajor = k_major_from_codes(codes, scales, zeros, group)
            qweight, scales, zeros = kmajor.qweight, kmajor.scales, kmajor.zeros
        else:
            qweight = pack_along(codes, self.bits, dim=0)
        for name in ("qweight", "qzeros", "scales", "g_idx", *self.checkpoint_params):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.qweight = nn.Parameter(qweight, requires_grad=False)
        layer.scales = nn.Parameter(scales.contiguous(), requires_grad=False)
        layer.wna16_zeros = None if zeros is None else nn.Parameter(zeros.contiguous(), requires_grad=False)
        layer.register_buffer("wna16_perm", perm, persistent=False)
        zeros_data = None if zeros is None else layer.wna16_zeros.data
        if layer.wna16_layout.layout == "kmajor":
            layer.wna16 = dataclasses.replace(kmajor, qweight=layer.qweight.data, scales=layer.scales.data,
                                              zeros=zeros_data)
        else:
            layer.wna16 = PackedWeight(layer.qweight.data, layer.scales.data, zeros_data, self.bits, group)
        if qweight.is_cuda and HAS_TRITON:  # made now, not first inside a CUDA graph capture
            splitk_workspace(qweight.device)


class GPTQLinearMethod(WNA16LinearMethod):
    """GPTQ (AutoGPTQ / GPTQModel "gptq" format): qweight [in/pw, out], qzeros [groups, out/pw] storing
    zero - 1, scales [groups, out], g_idx [in]."""

    def __init__(self, bits: int, group_size: int, sym: bool, desc_act: bool) -> None:
        super().__init__(bits, group_size)
        self.sym = sym
        self.desc_act = desc_act

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        per_word = 32 // self.bits
        groups = _check_sizes(input_size, output_sizes, self.group_size, per_word, "GPTQ")
        split_input = getattr(layer, "input_rank", None) is not None and layer.parallel.world_size > 1
        if self.desc_act and split_input and self.group_size != -1:
            raise ValueError("GPTQ act-order (desc_act) checkpoints with grouped scales cannot be split over the "
                             "input dim of row-parallel layers yet; serve with tensor_parallel_size 1")
        out = sum(output_sizes)
        group_input_dim = None if self.group_size == -1 else 0  # one group: every rank needs the whole row
        params = {
            "qweight": (_int_param(input_size // per_word, out), 0, 1, 0, per_word),
            "qzeros": (_int_param(groups, out // per_word), group_input_dim, 1, 1, per_word),
            "scales": (nn.Parameter(torch.empty(groups, out, dtype=params_dtype), requires_grad=False),
                       group_input_dim, 1, None, None),
            "g_idx": (_int_param(input_size), 0, None, None, None),
        }
        for name, (param, input_dim, output_dim, packed_dim, factor) in params.items():
            set_weight_attrs(param, {"input_dim": input_dim, "output_dim": output_dim, "packed_dim": packed_dim,
                                     "packed_factor": factor})
            layer.register_parameter(name, param)
        set_weight_attrs(layer.g_idx, {"weight_loader": _GIdxLoader(layer)})

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes = unpack_along(layer.qweight.data, self.bits, dim=0)  # [K, N]
        scales = layer.scales.data
        zeros = None
        if not self.sym:
            zeros = ((unpack_along(layer.qzeros.data, self.bits, dim=1) + 1) & (2**self.bits - 1)).to(scales.dtype)
        codes, perm = self._sort_by_group(codes, layer.g_idx.data)
        self._finish(layer, codes, scales, zeros, perm)


class _GIdxLoader:
    """Loads g_idx, one per fused shard in the checkpoint: q/k/v (gate/up) read one input, so GPTQ gave them one
    act-order permutation; a checkpoint whose shards disagree cannot share one fused matmul."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.first_shard: Any = None

    def __call__(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        from tokenmill.model.linear import load_partition

        if self.first_shard is None:
            self.first_shard = shard_id if shard_id is not None else "weight"
            load_partition(param, loaded, None, self.layer.input_rank, "g_idx")
            return
        previous = param.data.clone()
        load_partition(param, loaded, None, self.layer.input_rank, "g_idx")
        if not torch.equal(previous, param.data):
            raise ValueError(f"act-order g_idx of shard {shard_id!r} differs from shard {self.first_shard!r}'s; "
                             "fused q/k/v and gate/up need one permutation (re-quantize with shared inputs)")


class AWQLinearMethod(WNA16LinearMethod):
    """AWQ GEMM format (AutoAWQ): qweight [in, out/8] and qzeros [groups, out/8] packed along the output in the
    interleaved order 0 2 4 6 1 3 5 7, scales [groups, out]; zero points always."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        groups = _check_sizes(input_size, output_sizes, self.group_size, 8, "AWQ")
        out = sum(output_sizes)
        group_input_dim = None if self.group_size == -1 else 0
        params = {
            "qweight": (_int_param(input_size, out // 8), 0, 1, 1, 8),
            "qzeros": (_int_param(groups, out // 8), group_input_dim, 1, 1, 8),
            "scales": (nn.Parameter(torch.empty(groups, out, dtype=params_dtype), requires_grad=False),
                       group_input_dim, 1, None, None),
        }
        for name, (param, input_dim, output_dim, packed_dim, factor) in params.items():
            set_weight_attrs(param, {"input_dim": input_dim, "output_dim": output_dim, "packed_dim": packed_dim,
                                     "packed_factor": factor})
            layer.register_parameter(name, param)

    @staticmethod
    def _unpack_outputs(words: torch.Tensor) -> torch.Tensor:
        """[rows, out/8] AWQ words -> [rows, out] codes in natural output order."""
        values = unpack_along(words, 4, dim=1)
        order = torch.tensor(AWQ_UNPACK_ORDER, device=words.device)
        return values.reshape(values.shape[0], -1, 8).index_select(2, order).reshape(values.shape)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes = self._unpack_outputs(layer.qweight.data)  # [K, N]
        zeros = self._unpack_outputs(layer.qzeros.data).to(layer.scales.dtype)
        self._finish(layer, codes, layer.scales.data, zeros, None)


def _check_group_size(group_size: int, what: str) -> None:
    # The kernel steps through K one group-aligned power-of-two tile at a time.
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise ValueError(f"{what} group_size {group_size} is not supported; supported: -1 (one group) or a power "
                         f"of two >= 16 (32, 64 and 128 are the common ones)")


def _skipped(prefix: str, modules: list[str] | None) -> bool:
    return bool(modules) and any(m in prefix for m in modules)


@register_quantization_config("gptq")
class GPTQConfig(QuantizationConfig):
    def __init__(self, bits: int, group_size: int, sym: bool, desc_act: bool) -> None:
        self.bits, self.group_size, self.sym, self.desc_act = bits, group_size, sym, desc_act

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        bits = int(config.get("bits", 4))
        group_size = int(config.get("group_size", 128))
        fmt = config.get("checkpoint_format", "gptq")
        if bits not in (4, 8):
            raise ValueError(f"GPTQ with {bits} bits is not supported; supported: 4 and 8 bits")
        _check_group_size(group_size, "GPTQ")
        if fmt != "gptq":
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; supported: 'gptq' (v1)")
        gptq = cls(bits, group_size, bool(config.get("sym", True)), bool(config.get("desc_act", False)))
        # GPTQModel's lm_head=True (vLLM's lm_head_quantized): the LM head is stored packed like any linear
        gptq.lm_head_quantized = bool(config.get("lm_head", False))
        return gptq

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        if layer_prefix == "lm_head" and self.lm_head_quantized:
            return GPTQLinearMethod(self.bits, self.group_size, self.sym, self.desc_act)
        if layer_prefix in ("lm_head", "model.embed_tokens"):
            return DenseLinearMethod()
        return GPTQLinearMethod(self.bits, self.group_size, self.sym, self.desc_act)


@register_quantization_config("awq")
class AWQConfig(QuantizationConfig):
    def __init__(self, group_size: int, modules_to_not_convert: list[str] | None) -> None:
        self.group_size, self.modules_to_not_convert = group_size, modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        group_size = int(config.get("group_size", config.get("q_group_size", 128)))
        version = str(config.get("version", "gemm")).lower()
        if bits != 4:
            raise ValueError(f"AWQ with {bits} bits is not supported; supported: 4 bits")
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; supported: 'gemm'")
        if not config.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported; supported: zero_point true")
        _check_group_size(group_size, "AWQ")
        return cls(group_size, config.get("modules_to_not_convert"))

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        if layer_prefix in ("lm_head", "model.embed_tokens") or _skipped(layer_prefix, self.modules_to_not_convert):
            return DenseLinearMethod()
        return AWQLinearMethod(4, self.group_size)
