"""compressed-tensors checkpoints (quant_method "compressed-tensors", written by llm-compressor / the
``compressed-tensors`` package): a ``QuantizationConfig`` that reads ``config_groups`` + ``ignore`` and hands each
layer the scheme its group names, and the pack-quantized integer schemes (W4A16 / W8A16) served packed.

Schemes plug in with one line: a class with ``matches(weights, input_activations, fmt)`` and
``linear_method(weights, input_activations, fmt)`` decorated with ``@register_compressed_tensors_scheme``
(FP8 "float-quantized" lives in its own module). config.json is parsed here directly, so serving needs neither
the package nor pydantic; ``tokenmill quantize --format compressed-tensors`` writes through the package.

pack-quantized layout (per linear): ``weight_packed`` int32 [out, in * bits / 32] (signed codes + 2^(bits-1),
value j of a word at bits j*bits), ``weight_scale`` [out, groups] (channel: [out, 1]), asymmetric
``weight_zero_point`` int32 [out * bits / 32, groups] packed along the output the same way, ``weight_shape``
[2], and ``weight_g_idx`` [in] with act-order "group". W = (q - zero_point) * scale on the signed values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from tokenmill.model.linear_method import (
    DenseLinearMethod,
    LinearMethod,
    QuantizationConfig,
    register_quantization_config,
    set_weight_attrs,
)
from tokenmill.quantization.linear_methods import (
    FUSED_MODULES,
    WNA16LinearMethod,
    _check_group_size,
    _check_sizes,
    _GIdxLoader,
    _int_param,
)
from tokenmill.quantization.packing import unpack_along


class CompressedTensorsScheme(Protocol):
    """One kind of config group (e.g. pack-quantized int4 weights, no activation quantization)."""

    description: str  # for the "supported:" list of errors

    def matches(self, weights: dict[str, Any] | None, input_activations: dict[str, Any] | None, fmt: str) -> bool:
        ...

    def linear_method(self, weights: dict[str, Any], input_activations: dict[str, Any] | None,
                      fmt: str) -> LinearMethod:
        """The method for a layer of this group; ValueError with what is supported when a detail is not."""
        ...


@dataclass
class CompressedTensorsSchemes:
    """The registered schemes, tried in order; the first that matches a config group serves it."""

    schemes: list[CompressedTensorsScheme]

    def register(self, cls: type) -> type:
        self.schemes.append(cls())
        return cls

    def find(self, weights: dict[str, Any] | None, input_activations: dict[str, Any] | None,
             fmt: str, group: str) -> CompressedTensorsScheme:
        for scheme in self.schemes:
            if scheme.matches(weights, input_activations, fmt):
                return scheme
        supported = "; ".join(s.description for s in self.schemes)
        raise ValueError(f"compressed-tensors config group {group!r} (format {fmt!r}, weights {weights}, input "
                         f"activations {input_activations}) is not supported; supported: {supported}")


COMPRESSED_TENSORS_SCHEMES = CompressedTensorsSchemes([])
register_compressed_tensors_scheme: Callable[[type], type] = COMPRESSED_TENSORS_SCHEMES.register


def target_matches(target: str, module_name: str) -> bool:
    """compressed-tensors target rules: "Linear" (every linear), "re:<regex>" on the module name, or a name
    (exact, or a suffix after a dot)."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module_name) is not None
    return module_name == target or module_name.endswith("." + target)


@dataclass(frozen=True)
class _Group:
    name: str
    targets: tuple[str, ...]
    scheme: CompressedTensorsScheme
    weights: dict[str, Any]
    input_activations: dict[str, Any] | None
    fmt: str


@register_quantization_config("compressed-tensors")
class CompressedTensorsConfig(QuantizationConfig):
    def __init__(self, groups: list[_Group], ignore: list[str]) -> None:
        self.groups, self.ignore = groups, ignore

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CompressedTensorsConfig:
        if config.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config (sparse weights) is not supported; supported: "
                             "dense quantized weights")
        global_format = config.get("format") or "dense"
        groups = []
        for name, group in (config.get("config_groups") or {}).items():
            fmt = group.get("format") or global_format
            weights, acts = group.get("weights"), group.get("input_activations")
            scheme = COMPRESSED_TENSORS_SCHEMES.find(weights, acts, fmt, name)
            scheme.linear_method(weights, acts, fmt)  # validates the group's details now, not at the first layer
            targets = tuple(group.get("targets") or ())
            if not targets:
                raise ValueError(f"compressed-tensors config group {name!r} has no targets")
            groups.append(_Group(name, targets, scheme, weights, acts, fmt))
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups; nothing is quantized")
        return cls(groups, list(config.get("ignore") or []))

    def group_for(self, module_name: str) -> _Group | None:
        """The config group quantizing a checkpoint module, None when it stays dense (ignored or untargeted).
        A name or regex target beats the class target "Linear" (llm-compressor's precedence)."""
        if any(target_matches(entry, module_name) for entry in self.ignore):
            return None
        by_name = [g for g in self.groups if any(t != "Linear" and target_matches(t, module_name) for t in g.targets)]
        if by_name:
            return by_name[0]
        return next((g for g in self.groups if "Linear" in g.targets), None)

    def get_linear_method(self, layer_prefix: str) -> LinearMethod:
        if layer_prefix == "model.embed_tokens":
            return DenseLinearMethod()
        parent, _, leaf = layer_prefix.rpartition(".")
        modules = [f"{parent}.{m}" for m in FUSED_MODULES.get(leaf, (leaf,))] if parent else [layer_prefix]
        chosen = [self.group_for(m) for m in modules]
        if any(g is not chosen[0] for g in chosen):
            names = {m: (g.name if g else "dense") for m, g in zip(modules, chosen, strict=True)}
            raise ValueError(f"compressed-tensors checkpoint quantizes the fused parts of {layer_prefix} "
                             f"differently ({names}); they share one matmul, so they need one scheme")
        group = chosen[0]
        if group is None:
            return DenseLinearMethod()
        if layer_prefix == "lm_head":
            raise ValueError("compressed-tensors checkpoints with a quantized lm_head are not supported; "
                             "supported: lm_head in 'ignore'")
        return group.scheme.linear_method(group.weights, group.input_activations, group.fmt)


class CompressedTensorsWNA16LinearMethod(WNA16LinearMethod):
    """pack-quantized int4/int8 weights (module docstring) repacked into the W4A16/W8A16 kernel layout."""

    checkpoint_params = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")

    def __init__(self, bits: int, group_size: int, symmetric: bool, act_order_group: bool) -> None:
        super().__init__(bits, group_size)
        self.symmetric, self.act_order_group = symmetric, act_order_group

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        per_word = 32 // self.bits
        groups = _check_sizes(input_size, output_sizes, self.group_size, per_word, "compressed-tensors")
        out = sum(output_sizes)
        group_input_dim = None if self.group_size == -1 else 1  # one group (channel): every rank needs it whole
        params: dict[str, tuple[nn.Parameter, Any, Any, Any, Any]] = {
            "weight_packed": (_int_param(out, input_size // per_word), 1, 0, 1, per_word),
            "weight_scale": (nn.Parameter(torch.empty(out, groups, dtype=params_dtype), requires_grad=False),
                             group_input_dim, 0, None, None),
            "weight_shape": (nn.Parameter(torch.empty(2, dtype=torch.int64), requires_grad=False),
                             None, None, None, None),
        }
        if not self.symmetric:
            params["weight_zero_point"] = (_int_param(out // per_word, groups), group_input_dim, 0, 0, per_word)
        if self.act_order_group:
            params["weight_g_idx"] = (_int_param(input_size), 0, None, None, None)
        for name, (param, input_dim, output_dim, packed_dim, factor) in params.items():
            set_weight_attrs(param, {"input_dim": input_dim, "output_dim": output_dim, "packed_dim": packed_dim,
                                     "packed_factor": factor})
            layer.register_parameter(name, param)
        # The full [out, in] of each shard; our parameters' shapes already say it (checked by the loader).
        set_weight_attrs(layer.weight_shape, {"weight_loader": lambda param, loaded, shard_id=None: None})
        if self.act_order_group:
            set_weight_attrs(layer.weight_g_idx, {"weight_loader": _GIdxLoader(layer)})

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        codes = unpack_along(layer.weight_packed.data, self.bits, dim=1).t()  # [K, N], signed + 2^(bits-1)
        scales = layer.weight_scale.data.t()
        zeros = None  # symmetric: zero point 0 on the signed codes = 2^(bits-1) on the stored ones
        if not self.symmetric:
            zeros = unpack_along(layer.weight_zero_point.data, self.bits, dim=0).t().to(scales.dtype)
        perm = None
        if self.act_order_group:
            codes, perm = self._sort_by_group(codes, layer.weight_g_idx.data)
        self._finish(layer, codes, scales, zeros, perm)


@register_compressed_tensors_scheme
class PackQuantizedWNA16:
    description = ("pack-quantized int weights (4 or 8 bits, strategy group or channel, static, symmetric or "
                   "with zero points, act-order none/weight/group) with unquantized activations (W4A16, W8A16)")

    def matches(self, weights: dict[str, Any] | None, input_activations: dict[str, Any] | None, fmt: str) -> bool:
        return (fmt == "pack-quantized" and input_activations is None and weights is not None
                and weights.get("type", "int") == "int")

    def linear_method(self, weights: dict[str, Any], input_activations: dict[str, Any] | None,
                      fmt: str) -> LinearMethod:
        bits = int(weights.get("num_bits", 8))
        strategy = weights.get("strategy")
        if bits not in (4, 8):
            raise ValueError(f"compressed-tensors pack-quantized with {bits} bits is not supported; supported: 4, 8")
        if weights.get("dynamic"):
            raise ValueError("compressed-tensors dynamic weight quantization is not supported; supported: static")
        if strategy == "group":
            group_size = int(weights["group_size"])
            _check_group_size(group_size, "compressed-tensors")
        elif strategy == "channel":
            group_size = -1
        else:
            raise ValueError(f"compressed-tensors weight strategy {strategy!r} is not supported for int weights; "
                             f"supported: 'group', 'channel'")
        actorder = weights.get("actorder")
        if actorder not in (None, "weight", "group", False):
            raise ValueError(f"compressed-tensors actorder {actorder!r} is not supported; supported: null, "
                             f"'weight', 'group'")
        return CompressedTensorsWNA16LinearMethod(bits, group_size, bool(weights.get("symmetric", True)),
                                                  actorder == "group" and strategy == "group")
