"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding error over
the columns not yet quantized through the inverse Hessian of the layer's calibration inputs (H = 2 X^T X / n).

Optional act-order quantizes columns in decreasing diag(H) (the most active input channels first); the
checkpoint's g_idx then records each input channel's group.
"""

from __future__ import annotations

import torch

from tokenmill.quantization.packing import (
    QuantizedWeight,
    check_bits,
    group_params,
    quantize_codes,
    resolve_group_size,
)

BLOCK_SIZE = 128  # columns updated together before the lazy batch update of the rest


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool = False,
    damp_percent: float = 0.01,
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] given ``hessian`` [in, in] of its inputs; returns codes in channel order."""
    check_bits(bits)
    w = weight.detach().float().clone()
    out_features, in_features = w.shape
    group_size = resolve_group_size(group_size, in_features)
    h = hessian.detach().float().clone().to(w.device)
    dead = torch.diag(h) == 0  # channels never active in calibration: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_features, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    h += damp_percent * torch.mean(torch.diag(h)) * torch.eye(in_features, device=w.device)
    h_inv = _upper_cholesky_of_inverse(h)

    codes = torch.zeros_like(w)
    num_groups = in_features // group_size
    scales = torch.zeros(num_groups, out_features, device=w.device)
    zeros = torch.zeros(num_groups, out_features, device=w.device)
    scale = zero = None
    for start in range(0, in_features, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, in_features)
        block = w[:, start:end].clone()
        block_err = torch.zeros_like(block)
        block_inv = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:  # group parameters from the group's current (error-updated) weights
                span = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, :group_size]
                scale, zero = group_params(span, bits, sym)
                scales[col // group_size], zeros[col // group_size] = scale, zero
            q = quantize_codes(block[:, i : i + 1], scale, zero, bits)[:, 0]
            codes[:, col] = q
            err = (block[:, i] - (q - zero) * scale) / block_inv[i, i]
            block[:, i:] -= err[:, None] * block_inv[i, i:][None, :]
            block_err[:, i] = err
        w[:, end:] -= block_err @ h_inv[start:end, end:]

    inverse = torch.argsort(perm)
    g_idx = (torch.arange(in_features, device=w.device) // group_size)[inverse]
    return QuantizedWeight(
        codes=codes[:, inverse].to(torch.int32).cpu(),
        scales=scales.cpu(),
        zeros=zeros.cpu(),
        g_idx=g_idx.to(torch.int32).cpu(),
        bits=bits,
    )


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """U with U^T U = H^-1; its rows give the error-propagation weights of GPTQ's update."""
    for attempt in range(5):  # grow the damping if calibration left H numerically singular
        try:
            lower = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except torch.linalg.LinAlgError:
            h = h + (10.0**attempt) * 0.01 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], device=h.device)
    raise ValueError("the calibration Hessian is not positive definite even with extra damping; use more samples")
