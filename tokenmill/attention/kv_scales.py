"""One attention layer's FP8 KV-cache scales: the model owns them (vLLM keeps ``k_scale``/``v_scale`` on its
attention layer too) and hands them to the backend, which divides on store and multiplies back on read.

1.0 by default (vLLM's default); ``--calculate-kv-scales`` sets them once from the first real step's keys and
values. The scales stay at fixed addresses, so captured CUDA graphs read whatever they hold at replay.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tokenmill.attention.kv_cache import LayerKVCache

# The first step's largest |k| (|v|) lands on this value, not on the FP8 maximum (448 for e4m3): later tokens
# may be larger, and rotary embedding can grow a key element by up to sqrt(2). Same headroom as vLLM's
# K_SCALE_CONSTANT / V_SCALE_CONSTANT defaults.
K_SCALE_TARGET = 200.0
V_SCALE_TARGET = 100.0


class KVScales(nn.Module):
    """Per-tensor k and v dequantization scales of one layer (fp32 buffers of shape ())."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))

    def for_cache(
        self, kv_cache: LayerKVCache | torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scales to pass with this step's keys/values: None for a cache of exact values; for an FP8
        cache armed to calculate them, set from ``key``/``value`` first (on the device, no host sync)."""
        cache = LayerKVCache.of(kv_cache)
        shape = cache.spec.scale_shape
        if shape is None:
            return None, None
        if cache.calculate_scales:
            self.calculate(key, value)
            cache.calculate_scales = False
        if shape == ():
            return self.k_scale, self.v_scale
        return self.k_scale.expand(shape), self.v_scale.expand(shape)  # per head: one value broadcast

    def calculate(self, key: torch.Tensor, value: torch.Tensor) -> None:
        # A floor keeps an all-zero first step from giving a zero scale (division by it on store).
        self.k_scale.copy_((key.detach().abs().amax().float() / K_SCALE_TARGET).clamp_min(1e-6))
        self.v_scale.copy_((value.detach().abs().amax().float() / V_SCALE_TARGET).clamp_min(1e-6))


# Checkpoint names of a layer's KV-cache scales: vLLM / HF FP8 ("self_attn.k_scale"), llm-compressor's older
# output scales of the k/v projections ("self_attn.k_proj.output_scale").
_CHECKPOINT_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:(k|v)_scale|(k|v)_proj\.output_scale)$")


def checkpoint_kv_scale(name: str) -> tuple[int, str] | None:
    """(layer index, "k" or "v") when ``name`` is a checkpoint's KV-cache scale, else None."""
    match = _CHECKPOINT_KV_SCALE.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2) or match.group(3)


def load_kv_scale(scales: KVScales, which: str, loaded: torch.Tensor) -> None:
    """A checkpoint's per-tensor k or v scale into the layer's buffer (used when the cache stores FP8)."""
    value = loaded if isinstance(loaded, torch.Tensor) else loaded.narrow(0, 0, loaded.shape[0])
    if value.numel() != 1:
        raise ValueError(f"KV-cache scales must be one value per layer (per tensor); got shape {tuple(value.shape)}")
    target = scales.k_scale if which == "k" else scales.v_scale
    target.copy_(value.reshape(()).float())
