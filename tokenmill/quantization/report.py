"""The table ``tokenmill quantize`` ends with: relative output error of every quantized linear."""

from __future__ import annotations

from tokenmill.quantization.quantizer import LayerReport


def error_table(reports: list[LayerReport]) -> str:
    """One row per linear plus the mean; error = ||X (W - Wq)^T|| / ||X W^T|| on the calibration inputs."""
    if not reports:
        return "no linear was quantized"
    width = max(len(r.name) for r in reports)
    lines = [f"{'linear':<{width}}  rel. output error", f"{'-' * width}  -----------------"]
    lines += [f"{r.name:<{width}}  {r.rel_error:.5f}" for r in reports]
    mean = sum(r.rel_error for r in reports) / len(reports)
    lines.append(f"{'mean':<{width}}  {mean:.5f}")
    return "\n".join(lines)
