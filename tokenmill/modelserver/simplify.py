"""Graph cleanup with onnxslim (constant folding, dead-node and redundant-op removal), with node counts.

Runs after export and before validation, so the validated graph is the one that gets served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx


@dataclass
class SimplifyReport:
    nodes_before: int
    nodes_after: int

    def __str__(self) -> str:
        return f"nodes {self.nodes_before} -> {self.nodes_after}"


def count_nodes(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def simplify(src: str | Path, dst: str | Path | None = None) -> SimplifyReport:
    """Simplify ``src`` into ``dst`` (in place when ``dst`` is None) and report node counts."""
    import onnxslim

    model = onnx.load(str(src))
    before = count_nodes(model)
    slim = onnxslim.slim(model)
    onnx.checker.check_model(slim)
    onnx.save(slim, str(dst or src))
    return SimplifyReport(before, count_nodes(slim))
