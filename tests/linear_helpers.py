"""Helpers for linear-layer tests: a single-process stand-in for one tensor-parallel rank (layer tests build every
rank's layer in one process and combine the ranks' partial results themselves, so no collective may run), and a
fake GPTQ-shaped packed weight format to exercise the layout-driven loader with a non-dense method."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.context import ParallelContext
from tokenmill.model.linear_method import LinearMethod, set_weight_attrs


class NoCollectives:
    """Stands in for a process group; any use of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a collective ({name}) ran in a single-process layer test")


def rank_context(rank: int, world_size: int) -> ParallelContext:
    return ParallelContext(rank, world_size, NoCollectives() if world_size > 1 else None)


PACK = 8  # 4-bit values, 8 to an int32
GROUP = 16  # input columns per quantization group


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 sums in another order (split over ranks) differ in the last bits; scale the tolerance to the data."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """4-bit values (0..15) -> int32, 8 consecutive values along ``dim`` per element."""
    moved = values.movedim(dim, -1).long()
    shifted = moved.reshape(*moved.shape[:-1], -1, PACK) << (4 * torch.arange(PACK))
    packed = shifted.sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32).movedim(-1, dim)


def unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    moved = packed.movedim(dim, -1).long()
    nibbles = (moved.unsqueeze(-1) >> (4 * torch.arange(PACK))) & 0xF
    return nibbles.reshape(*moved.shape[:-1], -1).movedim(-1, dim)


class FakePackedMethod(LinearMethod):
    """A GPTQ-shaped format: qweight [in/8, out] packed along the input, qzeros [groups, out/8] packed along the
    output, scales [groups, out]; dequantized once after loading."""

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: list[int],
                       params_dtype: torch.dtype) -> None:
        out, groups = sum(output_sizes), input_size // GROUP
        qweight = nn.Parameter(torch.empty(input_size // PACK, out, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(qweight, {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "packed_factor": PACK})
        qzeros = nn.Parameter(torch.empty(groups, out // PACK, dtype=torch.int32), requires_grad=False)
        set_weight_attrs(qzeros, {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "packed_factor": PACK})
        scales = nn.Parameter(torch.empty(groups, out, dtype=params_dtype), requires_grad=False)
        set_weight_attrs(scales, {"input_dim": 0, "output_dim": 1, "packed_dim": None, "packed_factor": None})
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qzeros", qzeros)
        layer.register_parameter("scales", scales)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.dequantized = dequantize(layer.qweight.data, layer.qzeros.data, layer.scales.data)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.dequantized, bias)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[out, in] float weight of the fake format."""
    values = unpack(qweight, 0)  # [in, out]
    zeros = unpack(qzeros, 1).repeat_interleave(GROUP, dim=0)  # [in, out]
    return ((values - zeros) * scales.repeat_interleave(GROUP, dim=0)).t()


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dense [out, in] weight in the fake format (asymmetric 4-bit per group of ``GROUP`` input columns)."""
    grouped = weight.t().reshape(weight.shape[1] // GROUP, GROUP, weight.shape[0])  # [groups, GROUP, out]
    low, high = grouped.amin(1), grouped.amax(1)
    scales = (high - low).clamp_min(1e-6) / 15
    zeros = torch.round(-low / scales).clamp(0, 15)
    values = torch.round(grouped / scales[:, None] + zeros[:, None]).clamp(0, 15)
    return {"qweight": pack(values.reshape(weight.shape[1], -1), 0), "qzeros": pack(zeros, 1), "scales": scales}
