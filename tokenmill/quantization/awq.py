"""AWQ (Lin et al., 2023): scale the input channels that see large activations up before rounding (and fold the
inverse scale into the op that produces those inputs), so their weights lose less to quantization.

The per-channel scale is mean|x|^alpha, alpha searched on a grid for the smallest output error of the linears
that share the input. The output error of a weight change D on calibration inputs X is tr(D H D^T) / 2 with
H = 2 X^T X / n, so the search runs on the Hessian the quantizer collects anyway instead of re-running X.
"""

from __future__ import annotations

import torch

from tokenmill.quantization.packing import rtn_quantize

GRID = 20  # alpha in {0, 1/20, ..., 19/20}, as in the paper's search


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(D H D^T): squared output error (times 2/n) of the weight change ``delta`` [out, in]."""
    return float(((delta @ hessian) * delta).sum())


def search_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    act_mean: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Best per-input-channel scale [in] for the linears ``weights`` (each [out_i, in]) sharing one input."""
    act_mean = act_mean.float().clamp_min(1e-8)
    best_err, best_scale = float("inf"), torch.ones_like(act_mean)
    for step in range(GRID):
        scale = act_mean.pow(step / GRID)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centre the scales around 1 (the paper's norm)
        err = 0.0
        for weight in weights:
            w = weight.float()
            effective = rtn_quantize(w * scale, bits, group_size, sym=False).dequantize() / scale
            err += output_error(effective - w, hessian)
        if err < best_err:
            best_err, best_scale = err, scale
    return best_scale

