"""``tokenmill bench-model``: build each requested backend for one model and measure it per batch size.

ONNX Runtime runs the exported graph; torch runs the bundled nn.Module; TensorRT is skipped when not installed.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from tokenmill.modelserver.backends import OrtBackend, TorchBackend, build_tensorrt_engine, tensorrt_available
from tokenmill.modelserver.benchmark import measure, synthetic_feeds
from tokenmill.modelserver.model_config import config_from_onnx

BUNDLED = ("classifier", "sentiment")


def _onnx_for(model: str, onnx_dir: Path, spec) -> Path:
    if spec is None:
        path = Path(model)
        if not path.is_file():
            raise ValueError(f"--model must be one of {list(BUNDLED)} or an existing .onnx file, got {model!r}")
        return path
    path = onnx_dir / f"{model}.onnx"
    if not path.exists():
        from tokenmill.modelserver.export import export_spec
        from tokenmill.modelserver.simplify import simplify

        export_spec(spec, path)
        simplify(path)
    return path


def bench_model(model: str, backends: tuple[str, ...], device: str, batch_sizes: list[int], seq_len: int = 64,
                iterations: int = 20, warmup: int = 3, onnx_dir: Path | None = None, hf_dir: Path | None = None,
                half: bool = False, log: Callable[[str], None] = print) -> dict:
    """Measure ``model`` (a bundled name or an .onnx path) on each backend; returns a JSON-ready report."""
    onnx_dir = Path(onnx_dir or tempfile.mkdtemp(prefix="tokenmill-bench-"))
    onnx_dir.mkdir(parents=True, exist_ok=True)
    spec = None
    if model in BUNDLED:
        from tokenmill.modelserver.export import bundled_export_spec

        spec = bundled_export_spec(model, hf_dir=hf_dir)
    needs_onnx = spec is None or any(b in ("onnxruntime", "tensorrt") for b in backends)
    onnx_path = _onnx_for(model, onnx_dir, spec) if needs_onnx else None
    if onnx_path is not None:
        config = config_from_onnx(Path(onnx_path).stem, onnx_path)
        inputs = {s.name: (s.dims, s.dtype) for s in config.inputs}
    else:  # torch only: take the input layout from the example inputs, every non-batch text axis variable
        inputs = {name: ([-1] * (t.dim() - 1) if t.dtype == torch.int64 else list(t.shape[1:]), t.numpy().dtype)
                  for name, t in spec.example_inputs.items()}
    report: dict = {"model": model, "device": device, "seq_len": seq_len, "machine": platform.platform(),
                    "results": [], "skipped": {}}
    for name in backends:
        if name == "onnxruntime":
            backend = OrtBackend(onnx_path, device=device, spinning=True)  # one caller: trtexec-like
            report["providers"] = backend.providers
        elif name == "torch":
            if spec is None:
                report["skipped"][name] = "the torch backend needs a bundled model (an nn.Module), not an .onnx file"
                log(f"skipping torch: {report['skipped'][name]}")
                continue
            backend = TorchBackend(spec.module, spec.output_names, device="cuda" if device == "cuda" else "cpu",
                                   half=half)
            report["torch_dtype"] = "fp16" if half else "fp32"
            report["torch_compiled"] = backend.forward is not backend.module
        elif name == "tensorrt":
            if not tensorrt_available():
                report["skipped"][name] = "the tensorrt package is not installed"
                log(f"skipping tensorrt: {report['skipped'][name]}")
                continue
            build_tensorrt_engine(onnx_path, onnx_dir / f"{model}.plan", max_batch=max(batch_sizes))
            report["skipped"][name] = "engine built; running .plan files needs a TensorRT runtime binding (not wired yet)"
            continue
        else:
            raise ValueError(f"backend {name!r} must be one of onnxruntime, torch, tensorrt")
        for batch in batch_sizes:
            feeds = synthetic_feeds(inputs, batch, seq_len)
            result = measure(lambda b=backend, f=feeds: b.run(f), batch, name, warmup=warmup, iterations=iterations)
            report["results"].append(result.as_dict())
            log(result.line())
    return report
