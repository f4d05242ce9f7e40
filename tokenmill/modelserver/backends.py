"""Execution backends behind one small interface: ONNX Runtime (best EP), torch (compile + CUDA graphs), TensorRT.

A backend runs one batch: input name -> array in, output name -> array out, on a chosen instance.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

ORT_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class Backend(Protocol):
    name: str
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray], instance: int = 0) -> dict[str, np.ndarray]: ...


def best_ort_providers(device: str = "auto") -> list[str]:
    """TensorRT > CUDA > CPU among the providers this onnxruntime build has; ``device='cpu'`` forces CPU."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    chosen = [p for p in ORT_PREFERENCE if p in available]
    if device == "cuda" and "CUDAExecutionProvider" not in chosen:
        raise RuntimeError(f"device 'cuda' asked for but onnxruntime only has {sorted(available)}")
    return chosen


class OrtBackend:
    """One InferenceSession per instance, so concurrent instances never share intra-op thread pools."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, instances: int = 1, device: str = "auto", threads: int | None = None,
                 spinning: bool = False) -> None:
        import onnxruntime as ort

        self.providers = best_ort_providers(device)
        # Split the cores between instances; two instances each claiming every core only thrash.
        threads = threads or max(1, (os.cpu_count() or 1) // instances)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Spinning worker threads keep every core busy between batches, starving the server's event loop
        # (measured: served MiniLM fell to 77/s vs 871/s direct); a lone benchmark caller may turn it on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = [ort.InferenceSession(str(path), options, providers=self.providers) for _ in range(instances)]
        self.output_names = [o.name for o in self.sessions[0].get_outputs()]
        self.input_names = [i.name for i in self.sessions[0].get_inputs()]

    def run(self, feeds: dict[str, np.ndarray], instance: int = 0) -> dict[str, np.ndarray]:
        outs = self.sessions[instance % len(self.sessions)].run(None, feeds)
        return dict(zip(self.output_names, outs, strict=True))


class TorchBackend:
    """Runs an nn.Module directly: eager on CPU; on CUDA, torch.compile with CUDA graphs (mode reduce-overhead)."""

    name = "torch"

    def __init__(self, module: nn.Module, output_names: list[str], device: str = "cpu", compile: bool | None = None,
                 half: bool = False) -> None:
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        if half:
            self.module = self.module.half()
        self.half = half
        self.output_names = output_names
        use_compile = self.device.type == "cuda" if compile is None else compile
        # reduce-overhead = CUDA graphs; dynamic=False gives one static graph per input shape (a few batch sizes).
        self.forward = (torch.compile(self.module, mode="reduce-overhead", dynamic=False) if use_compile
                        else self.module)

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray], instance: int = 0) -> dict[str, np.ndarray]:
        args = []
        for value in feeds.values():
            t = torch.from_numpy(value).to(self.device, non_blocking=True)
            args.append(t.half() if self.half and t.is_floating_point() else t)
        out = self.forward(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs, strict=True)}


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def build_tensorrt_engine(onnx_path: str | Path, engine_path: str | Path, fp16: bool = True,
                          max_batch: int = 16) -> Path:
    """Build a serialized TensorRT engine with a dynamic-batch profile; raises when tensorrt is not installed."""
    if not tensorrt_available():
        raise RuntimeError("the tensorrt package is not installed; use the onnxruntime or torch backend")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = [d if d > 0 else 128 for d in tensor.shape[1:]]
        profile.set_shape(tensor.name, [1, *rest], [max(1, max_batch // 2), *rest], [max_batch, *rest])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    Path(engine_path).write_bytes(bytes(engine))
    return Path(engine_path)
