"""A model repository on disk (``DIR/<model>/<version>/model.onnx`` + ``DIR/<model>/config.yaml``) and its loaded models.

Load/unload follow the KServe v2 repository extension; every numeric version directory is served, latest by default.
"""

from __future__ import annotations

import asyncio
import os
from functools import partial
from pathlib import Path

import numpy as np

from tokenmill.modelserver.backends import OrtBackend
from tokenmill.modelserver.batcher import DynamicBatcher
from tokenmill.modelserver.errors import BadInputError, ModelNotFoundError, ModelNotReadyError
from tokenmill.modelserver.metrics import ServerMetrics
from tokenmill.modelserver.model_config import ModelConfig
from tokenmill.modelserver.processing import encode_texts, normalize_images


class ServedModel:
    """One loaded version: its backend instances, dynamic batcher and task helpers (labels, tokenizer)."""

    def __init__(self, config: ModelConfig, version: str, path: Path, metrics: ServerMetrics, device: str,
                 platform: str | None = None, thread_share: int = 1) -> None:
        """``platform`` overrides config.platform; ``thread_share``: processes sharing the cores (HTTP workers)."""
        self.config = config
        self.version = version
        self.platform = platform or config.platform
        if self.platform == "torch":
            if config.torch is None:
                raise ValueError(f"model {config.name!r} has no 'torch:' section in config.yaml, so the torch "
                                 "backend cannot build it; add one (model: classifier|sentiment) or serve with onnxruntime")
            from tokenmill.modelserver.torch_backend import TorchServingBackend, build_module

            torch_device = "cuda" if device in ("cuda", "auto") and torch_cuda_available() else "cpu"
            if device == "cuda" and torch_device != "cuda":
                raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device")
            self.backend = TorchServingBackend(build_module(config.torch), config, torch_device)
        else:
            threads = config.intra_op_threads or max(1, (os.cpu_count() or 1) // (config.instance_count * thread_share))
            self.backend = OrtBackend(path, instances=config.instance_count, device=device, threads=threads,
                                      spinning=config.ort_spinning)
        labels = {"model": config.name, "version": version}
        self.metrics = {
            name: getattr(metrics, name).labels(**labels)
            for name in ("requests", "failures", "inferences", "executions", "queue_seconds", "compute_seconds",
                         "batch_size")
        }
        self.labels = list(config.task.labels)
        if config.task.labels_file:
            self.labels = (path.parent.parent / config.task.labels_file).read_text().splitlines()
        self.tokenizer = None
        if config.task.tokenizer_dir:
            from tokenmill.modelserver.bundled import load_tokenizer

            self.tokenizer = load_tokenizer(Path(config.task.tokenizer_dir))
        tokenize = partial(encode_texts, self.tokenizer) if self.tokenizer is not None else None
        self.pixel_size = pixel_size(config)
        self.batcher = DynamicBatcher(config, self._run, on_batch=self._on_batch,
                                      on_queue=self.metrics["queue_seconds"].observe, tokenize=tokenize)

    def _run(self, feeds: dict[str, np.ndarray], instance: int) -> dict[str, np.ndarray]:
        """Run one merged batch. A batch of uint8 pixels (from ``infer_pixels``) is normalised here, on the batch's
        worker thread, unless the backend does it itself (the torch backend: on the device, after a 4x smaller copy)."""
        name = self.config.inputs[0].name
        if self.pixel_size and feeds[name].dtype == np.uint8 and not getattr(self.backend, "takes_pixels", False):
            feeds = {name: normalize_images(feeds[name])}
        return self.backend.run(feeds, instance)

    def _on_batch(self, rows: int, seconds: float) -> None:
        self.metrics["executions"].inc()
        self.metrics["inferences"].inc(rows)
        self.metrics["batch_size"].observe(rows)
        self.metrics["compute_seconds"].observe(seconds)

    def check_inputs(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs in config order, or BadInputError naming what was expected."""
        expected = {spec.name: spec for spec in self.config.inputs}
        unknown = sorted(set(inputs) - set(expected))
        missing = sorted(set(expected) - set(inputs))
        if unknown or missing:
            raise BadInputError(
                f"model {self.config.name!r} expects inputs {sorted(expected)}; unknown {unknown}, missing {missing}"
            )
        checked, batch = {}, None
        for name, spec in expected.items():
            arr = inputs[name]
            want = self.config.full_shape(spec)
            if arr.dtype != spec.dtype:
                raise BadInputError(f"input {name!r} must be {spec.datatype}, got {arr.dtype.name}")
            if arr.ndim != len(want) or any(w not in (-1, s) for w, s in zip(want, arr.shape, strict=True)):
                raise BadInputError(f"input {name!r} must have shape {want} (-1 = any), got {list(arr.shape)}")
            if self.config.max_batch_size > 0:
                if not 1 <= arr.shape[0] <= self.config.max_batch_size:
                    raise BadInputError(
                        f"input {name!r}: batch size {arr.shape[0]} must be between 1 and "
                        f"max_batch_size {self.config.max_batch_size}"
                    )
                if batch is not None and arr.shape[0] != batch:
                    raise BadInputError(f"all inputs must share the batch size; {name!r} has {arr.shape[0]}, not {batch}")
                batch = arr.shape[0]
            checked[name] = arr
        return checked

    async def infer(self, inputs: dict[str, np.ndarray] | list[str]) -> dict[str, np.ndarray]:
        """Tensors (checked against the config here), or checked texts that the batcher tokenizes per batch."""
        try:
            outputs = await self.batcher.infer(inputs if isinstance(inputs, list) else self.check_inputs(inputs))
        except Exception:
            self.metrics["failures"].inc()
            raise
        self.metrics["requests"].inc()
        return outputs

    async def infer_pixels(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """N x H x W x 3 uint8 images already at the input size (``processing.decode_resized``) for an image model
        whose input is float N x 3 x H x W: they batch as uint8 and are normalised once per batch."""
        if not self.pixel_size:
            raise BadInputError(f"model {self.config.name!r} does not take 3 x H x W float images")
        try:
            outputs = await self.batcher.infer({self.config.inputs[0].name: pixels})
        except Exception:
            self.metrics["failures"].inc()
            raise
        self.metrics["requests"].inc()
        return outputs

    def metadata(self) -> dict:
        def tensors(specs):
            return [{"name": s.name, "datatype": s.datatype, "shape": self.config.full_shape(s)} for s in specs]

        return {"name": self.config.name, "versions": [self.version], "platform": self.platform,
                "inputs": tensors(self.config.inputs), "outputs": tensors(self.config.outputs)}


def pixel_size(config: ModelConfig) -> tuple[int, int] | None:
    """(height, width) when the model takes one batched float 3 x H x W image input (the task endpoint can then send
    uint8 pixels), else None."""
    if config.task.kind != "image_classification" or len(config.inputs) != 1 or config.max_batch_size < 1:
        return None
    spec = config.inputs[0]
    if not np.issubdtype(spec.dtype, np.floating) or len(spec.dims) != 3 or spec.dims[0] != 3 or -1 in spec.dims:
        return None
    return spec.dims[1], spec.dims[2]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class ModelRepository:
    def __init__(self, root: str | Path, metrics: ServerMetrics, device: str = "auto", backend: str = "config",
                 thread_share: int = 1) -> None:
        """``backend``: "config" (each model's platform) or a platform forced on every model."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"model repository {self.root} is not a directory")
        self.metrics = metrics
        self.device = device
        self.platform = None if backend == "config" else backend
        self.thread_share = thread_share
        self.loaded: dict[str, dict[str, ServedModel]] = {}  # model -> version -> served
        self.errors: dict[str, str] = {}
        self.lock = asyncio.Lock()

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "config.yaml").is_file())

    def versions_on_disk(self, name: str, config: ModelConfig) -> list[str]:
        model_dir = self.root / name
        needs_file = (self.platform or config.platform) == "onnxruntime"  # torch builds from config.torch
        found = [p.name for p in model_dir.iterdir()
                 if p.name.isdigit() and p.is_dir() and (not needs_file or (p / config.model_file).is_file())]
        return sorted(found, key=int)

    def index(self) -> list[dict]:
        rows = []
        for name in self.names():
            versions = self.loaded.get(name)
            if versions:
                rows += [{"name": name, "version": v, "state": "READY", "reason": ""} for v in versions]
            else:
                rows.append({"name": name, "state": "UNAVAILABLE", "reason": self.errors.get(name, "unloaded")})
        return rows

    async def load(self, name: str) -> None:
        if name not in self.names():
            raise ModelNotFoundError(f"model {name!r} is not in repository {self.root}; found {self.names()}")
        async with self.lock:
            await self._unload_locked(name)
            try:
                config = ModelConfig.load(self.root / name / "config.yaml")
                if config.name != name:
                    raise ValueError(f"config.yaml name {config.name!r} must match its directory {name!r}")
                versions = self.versions_on_disk(name, config)
                if not versions:
                    raise ValueError(f"model {name!r} has no version directory holding {config.model_file}")
                served = {}
                for v in versions:
                    path = self.root / name / v / config.model_file
                    served[v] = await asyncio.to_thread(ServedModel, config, v, path, self.metrics, self.device,
                                                        self.platform, self.thread_share)
                    served[v].batcher.start()
            except Exception as exc:
                self.errors[name] = str(exc)
                raise
            self.errors.pop(name, None)
            self.loaded[name] = served

    async def _unload_locked(self, name: str) -> None:
        for served in self.loaded.pop(name, {}).values():
            await served.batcher.stop()

    async def unload(self, name: str) -> None:
        if name not in self.loaded:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self.loaded)}")
        async with self.lock:
            await self._unload_locked(name)

    async def load_all(self) -> None:
        for name in self.names():
            await self.load(name)

    async def close(self) -> None:
        for name in list(self.loaded):
            await self._unload_locked(name)

    def get(self, name: str, version: str | None = None) -> ServedModel:
        versions = self.loaded.get(name)
        if not versions:
            if name in self.names():
                raise ModelNotReadyError(f"model {name!r} is in the repository but not loaded")
            raise ModelNotFoundError(f"unknown model {name!r}; loaded models: {sorted(self.loaded)}")
        if version is None:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions, key=int)}")
        return versions[version]
