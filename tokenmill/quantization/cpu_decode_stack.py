"""A decode step of a Llama-family stack on CPU whose linears are in PyTorch's int4 / int8 CPU kernel layout, run as
one flat loop over weights gathered once, instead of through the modules.

At 135M parameters (SmolLM2) a batch-1 decode step runs ~400 small ops; the module path adds Python work around
each one (module calls, linear-method dispatch, format checks, the rotary table check, the attention backend's
checks), which with two threads does not shrink while the matmuls halve. Here every layer's kernel weights,
scales in bf16 and norm weights are read once, and the step calls the same ops in the same order with the same
rounding as the module path (bit-identical hidden states, tests/quantization/test_cpu_decode_stack.py): embed,
then per layer rms norm -> fused q|k|v -> one rotation of q and k side by side -> cache write and SDPA
(attention/cpu_decode.py) -> o_proj -> residual + rms norm -> fused gate|up -> SwiGLU -> down.

``for_model`` builds the stack once (None when a layer does not fit: biases, per-head q/k norms, act-order,
tensor parallelism, a format without a CPU kernel) and ``CPUDecodeStack.accepts`` checks each step (CPU, bf16,
a decode-shaped step over an exact bf16 cache); anything else runs the module path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention import cpu_decode
from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels.wna16_cpu import CPUWeight, cpu_weight
from tokenmill.model.layers import rotary_tables, rotate_half


@dataclass(frozen=True)
class FlatLinear:
    """One linear's kernel call, its arguments resolved once (``cpu_linear`` without the per-call lookups)."""

    kind: str  # "int4" | "int8"
    weight: torch.Tensor
    group_size: int
    scales: torch.Tensor  # in bf16, as ``CPUWeight.scales_for`` hands the kernel

    @classmethod
    def of(cls, weight: CPUWeight) -> FlatLinear:
        return cls(weight.kind, weight.weight, weight.group_size, weight.scales_for(torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4":
            return torch._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales)
        return torch._weight_int8pack_mm(x, self.weight, self.scales)


@dataclass(frozen=True)
class FlatLayer:
    qkv: FlatLinear
    o: FlatLinear
    gate_up: FlatLinear
    down: FlatLinear
    input_norm: torch.Tensor
    post_norm: torch.Tensor


def _flat_linear(layer: torch.nn.Module) -> FlatLinear | None:
    """The linear's CPU kernel call, or None when the module path must run it (dense, bias, act-order, TP)."""
    if getattr(layer, "wna16", None) is None or layer.bias is not None or getattr(layer, "wna16_perm", None) is not None:
        return None
    if getattr(layer, "reduce", False) or layer.parallel.world_size != 1:
        return None
    weight = cpu_weight(layer)
    return None if weight is None or weight.kind not in ("int4", "int8") else FlatLinear.of(weight)


class CPUDecodeStack:
    """The decoder's weights, flattened; ``forward`` is ``LlamaModel.forward`` for the steps ``accepts``."""

    def __init__(self, model: torch.nn.Module, layers: list[FlatLayer]) -> None:
        first = model.layers[0].self_attn
        self.model = model
        self.layers = layers
        self.eps = model.norm.eps
        self.num_heads, self.num_kv_heads, self.head_dim = first.num_heads, first.num_kv_heads, first.head_dim
        self.scale = first.scale

    def accepts(self, input_ids: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> bool:
        """A decode-shaped step on CPU over exact bf16 caches (no FP8 scales)."""
        first = next(iter(kv_caches), None)
        if input_ids.device.type != "cpu" or meta.decode_query_len <= 0 or first is None:
            return False
        spec = LayerKVCache.of(first).spec
        return spec.dtype == torch.bfloat16 and spec.scale_shape is None and spec.scale_granularity is None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        tokens, heads, kv_heads, dim = input_ids.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rotary_tables(self.model.rotary_emb.cos_sin_cache, positions, torch.bfloat16)
        plan = None
        residual = self.model.embed_tokens(input_ids)
        hidden = _rms_norm(residual, self.layers[0].input_norm, self.eps)
        for index, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            qkv = layer.qkv(hidden).view(tokens, heads + 2 * kv_heads, dim)
            rotated = rotate_half(qkv[:, : heads + kv_heads], cos, sin)  # q and k side by side: one rotation
            cache = LayerKVCache.of(kv_cache)
            if plan is None:
                plan = self._plan(meta, cache.block_size)
            attn = cpu_decode.store_and_attend(rotated[:, :heads], rotated[:, heads:], qkv[:, heads + kv_heads:],
                                               cache, meta, plan, self.scale)
            # the residual add is fused into the next norm, as rms_norm(x, w, eps, residual) does
            residual = layer.o(attn.reshape(tokens, heads * dim)) + residual
            hidden = _rms_norm(residual, layer.post_norm, self.eps)
            gate_up = layer.gate_up(hidden)
            half = gate_up.shape[-1] // 2
            residual = layer.down(F.silu(gate_up[..., :half]) * gate_up[..., half:]) + residual
            norm = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.model.norm.weight
            hidden = _rms_norm(residual, norm, self.eps)
        return hidden

    def _plan(self, meta: AttentionMetadata, block_size: int) -> cpu_decode.DecodePlan:
        """The step's decode plan, shared with the backend's (built here when this step has none yet)."""
        plan = getattr(meta, "decode_plan", None)
        if plan is None or plan.block_size != block_size:
            plan = cpu_decode.DecodePlan.build(meta, block_size)
            if hasattr(meta, "decode_plan"):
                meta.decode_plan = plan
        return plan


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model/layers.py ``rms_norm``'s CPU formula (variance in fp32, rounded to x's dtype, then the weight)."""
    return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def for_model(model: torch.nn.Module) -> CPUDecodeStack | None:
    """The flat stack of a ``LlamaModel`` whose every layer fits (module docstring), or None."""
    if not model.layers or model.norm.weight.dtype != torch.bfloat16 or model.norm.weight.device.type != "cpu":
        return None
    if not isinstance(model.layers[0].self_attn.attn_backend, TorchAttentionBackend):  # its CPU decode path
        return None
    layers = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.q_norm is not None or attn.k_norm is not None:
            return None
        linears = [_flat_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(linear is None for linear in linears):
            return None
        layers.append(FlatLayer(*linears, layer.input_layernorm.weight, layer.post_attention_layernorm.weight))
    return CPUDecodeStack(model, layers)
