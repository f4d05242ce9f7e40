"""Polygraphy-style check: run PyTorch and ONNX Runtime on the same inputs and compare every output.

Reports max absolute / relative difference per output and raises when one is above tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn


class ValidationError(RuntimeError):
    """An exported graph disagrees with its PyTorch source beyond tolerance."""


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float


@dataclass
class ValidationReport:
    atol: float
    cases: dict[str, list[OutputDiff]] = field(default_factory=dict)  # case name -> one diff per output

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for diffs in self.cases.values() for d in diffs), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.atol

    def lines(self) -> list[str]:
        return [
            f"{case:>10} {d.name:>12}: max_abs={d.max_abs:.3e} max_rel={d.max_rel:.3e}"
            for case, diffs in self.cases.items()
            for d in diffs
        ]


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> list[OutputDiff]:
    diffs = []
    for name, ref, got in zip(names, reference, candidate, strict=True):
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        err = np.abs(ref64 - got64)
        # Relative error against |ref| with a floor, so near-zero logits do not blow the ratio up.
        rel = err / np.maximum(np.abs(ref64), 1e-6)
        diffs.append(OutputDiff(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0))))
    return diffs


def torch_outputs(module: nn.Module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(v) for v in feeds.values()])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().float().numpy() for o in outs]


def validate(
    module: nn.Module, onnx_path: str | Path, cases: dict[str, dict[str, np.ndarray]], atol: float = 1e-4
) -> ValidationReport:
    """Run each named case (input name -> array) through both; raise ValidationError above ``atol``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    report = ValidationReport(atol)
    for case, feeds in cases.items():
        got = session.run(None, feeds)
        report.cases[case] = compare(torch_outputs(module, feeds), [np.asarray(g) for g in got], names)
    if not report.passed:
        raise ValidationError(
            f"ONNX output differs from PyTorch by max_abs={report.max_abs:.3e}, above the tolerance {atol:.1e}:\n"
            + "\n".join(report.lines())
        )
    return report
