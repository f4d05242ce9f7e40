"""One entry point for the decode-sized linear kernels the start-up tuner chooses between: the GEMV (one or
two rows) and the tiled GEMM (up to a few hundred rows), each with its own config type."""

from __future__ import annotations

import torch

from tokenmill.kernels.gemv import GEMV_CANDIDATES, GEMV_MAX_ROWS, GemvConfig, gemv
from tokenmill.kernels.tiled_gemm import TileConfig, tiled_linear
from tokenmill.kernels.tiled_gemm import candidates_for as tiled_candidates_for

KernelConfig = GemvConfig | TileConfig


def candidates_for(rows: int) -> tuple[KernelConfig, ...]:
    """Configs worth timing at ``rows`` rows."""
    return (GEMV_CANDIDATES if rows <= GEMV_MAX_ROWS else ()) + tiled_candidates_for(rows)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: KernelConfig) -> torch.Tensor:
    """x W^T (+ b) with the kernel ``config`` belongs to."""
    if isinstance(config, GemvConfig):
        return gemv(x, weight, bias, config)
    return tiled_linear(x, weight, bias, config)
