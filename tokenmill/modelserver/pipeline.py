"""The export pipeline: torch -> ONNX -> onnxslim -> validate -> FP16/INT8 with agreement -> repository entry.

Writes ``DIR/<name>/<version>/model.onnx`` (+ quantized variants), ``config.yaml`` and ``export_report.json``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tokenmill.modelserver import bundled, processing
from tokenmill.modelserver.export import ExportSpec, bundled_export_spec, export_spec
from tokenmill.modelserver.model_config import (
    DynamicBatching,
    ModelConfig,
    TaskConfig,
    TorchConfig,
    config_from_onnx,
)
from tokenmill.modelserver.quantize import agreement, to_fp16, to_int8
from tokenmill.modelserver.simplify import simplify
from tokenmill.modelserver.validate import validate

VARIANTS = ("fp16", "int8", "int8_a16")


def print_warning(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


def _random_cases(spec: ExportSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for name, example in spec.example_inputs.items():
        shape = list(example.shape)
        shape[0] = 3  # a batch size other than the traced one proves the batch axis is dynamic
        if name == "input_ids":
            shape[1] = 11
            feeds[name] = rng.integers(1000, 20000, size=shape, dtype=np.int64)
        elif name == "attention_mask":
            shape[1] = 11
            mask = np.ones(shape, dtype=np.int64)
            mask[1, 7:] = 0
            feeds[name] = mask
        elif example.dtype.is_floating_point:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            feeds[name] = np.zeros(shape, dtype=example.numpy().dtype)
    return feeds


def real_eval_set(spec: ExportSpec) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """Fixed evaluation feeds (and labels when known) for the bundled tasks."""
    if spec.task == "image_classification":
        return processing.image_feeds(processing.eval_images()), None
    if spec.task == "text_classification" and "tokenizer_dir" in spec.extra:
        from tokenmill.modelserver.train_head import is_held_out, load_rows

        rows = [r for r in load_rows() if is_held_out(r)]
        tokenizer = bundled.load_tokenizer(Path(spec.extra["tokenizer_dir"]))
        return processing.text_feeds(tokenizer, [r["text"] for r in rows]), np.array([r["label"] for r in rows])
    return [], None


def calibration_set(spec: ExportSpec, size: int) -> list[dict[str, np.ndarray]]:
    """Calibration feeds disjoint from the evaluation set (other photos / training sentences)."""
    if spec.task == "image_classification":
        from skimage import data

        images = []
        for name in ("camera", "moon", "page", "text", "brick", "grass", "gravel", "coins", "horse", "clock"):
            gray = np.asarray(getattr(data, name)()).astype(np.uint8)
            images.append(np.repeat(gray[..., None], 3, axis=-1))
        for name in ("retina", "colorwheel", "coffee", "astronaut"):
            rgb = np.asarray(getattr(data, name)())[..., :3]
            h, w = rgb.shape[:2]
            images.append(rgb[: h // 2, w // 3 :])
        return processing.image_feeds(images[:size], batch_size=4)
    if spec.task == "text_classification" and "tokenizer_dir" in spec.extra:
        from tokenmill.modelserver.train_head import is_held_out, load_rows

        texts = [r["text"] for r in load_rows() if not is_held_out(r)][:size]
        return processing.text_feeds(bundled.load_tokenizer(Path(spec.extra["tokenizer_dir"])), texts, batch_size=8)
    rng = np.random.default_rng(1)
    return [_random_cases(spec, rng) for _ in range(max(1, size // 3))]


def default_config(name: str, spec: ExportSpec, onnx_path: Path, model_dir: Path) -> ModelConfig:
    config = _task_config(name, spec, onnx_path, model_dir)
    if "torch_model" in spec.extra:  # bundled architectures can also be served by the torch backend
        hf_dir = spec.extra.get("tokenizer_dir") if spec.extra["torch_model"] == "sentiment" else None
        config.torch = TorchConfig(model=spec.extra["torch_model"], hf_dir=hf_dir)
    return config


def _task_config(name: str, spec: ExportSpec, onnx_path: Path, model_dir: Path) -> ModelConfig:
    if spec.task == "image_classification":
        (model_dir / "labels.txt").write_text("\n".join(bundled.imagenet_labels()) + "\n")
        task = TaskConfig(kind="image_classification", labels_file="labels.txt", top_k=5)
        batching = DynamicBatching(preferred_batch_sizes=[4, 8], max_queue_delay_ms=5.0)
        return config_from_onnx(name, onnx_path, max_batch_size=16, dynamic_batching=batching, task=task,
                                instance_count=1)
    if spec.task == "text_classification":
        task = TaskConfig(kind="text_classification", labels=list(spec.extra.get("labels", [])),
                          tokenizer_dir=spec.extra.get("tokenizer_dir"))
        batching = DynamicBatching(preferred_batch_sizes=[8, 16], max_queue_delay_ms=5.0,
                                   pad_inputs={"input_ids": 0, "attention_mask": 0})
        return config_from_onnx(name, onnx_path, max_batch_size=32, dynamic_batching=batching, task=task)
    return config_from_onnx(name, onnx_path, max_batch_size=16)


def export_to_repository(
    name: str,
    repository: Path,
    spec: ExportSpec | None = None,
    version: int = 1,
    variants: tuple[str, ...] = VARIANTS,
    calibration_size: int = 8,
    atol: float = 1e-4,
    min_top1_agreement: float = 0.8,
    keep_failed_variants: bool = False,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print_warning,
) -> dict:
    """Run the whole pipeline for one model; returns (and saves) the export report.

    A variant whose top-1 agreement with the fp32 graph is below ``min_top1_agreement`` is reported through ``warn``
    and its file deleted (so nothing can serve it) unless ``keep_failed_variants``; the report lists it as failed.
    """
    if not 0.0 <= min_top1_agreement <= 1.0:
        raise ValueError(f"min_top1_agreement ({min_top1_agreement}) must be between 0 and 1")
    spec = spec or bundled_export_spec(name)
    model_dir = Path(repository) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    report: dict = {"model": name, "version": version, "task": spec.task}

    start = time.perf_counter()
    export_spec(spec, onnx_path)
    report["export_s"] = round(time.perf_counter() - start, 2)
    slim = simplify(onnx_path)
    report["nodes_before"], report["nodes_after"] = slim.nodes_before, slim.nodes_after
    log(f"[{name}] exported in {report['export_s']}s; onnxslim {slim}")

    rng = np.random.default_rng(0)
    eval_feeds, labels = real_eval_set(spec)
    cases = {"random": _random_cases(spec, rng)}
    cases.update({f"real{i}": feeds for i, feeds in enumerate(eval_feeds[:2])})
    checked = validate(spec.module, onnx_path, cases, atol=atol)
    report["validation"] = {"atol": atol, "max_abs": checked.max_abs,
                            "cases": {c: [asdict(d) for d in ds] for c, ds in checked.cases.items()}}
    for line in checked.lines():
        log(f"[{name}] {line}")
    log(f"[{name}] fp32 ONNX matches PyTorch: max_abs {checked.max_abs:.2e} <= {atol:.0e}")

    report["variants"], report["failed_variants"] = {}, []
    feeds = eval_feeds or [cases["random"]]
    for variant in variants:
        out = version_dir / f"model.{variant}.onnx"
        start = time.perf_counter()
        if variant == "fp16":
            to_fp16(onnx_path, out)
        elif variant in ("int8", "int8_a16"):
            bits = 16 if variant == "int8_a16" else 8
            to_int8(onnx_path, out, calibration_set(spec, calibration_size), activation_bits=bits)
        else:
            raise ValueError(f"variant {variant!r} must be one of {list(VARIANTS)}")
        result = agreement(onnx_path, out, variant, feeds, labels)
        report["variants"][variant] = dict(asdict(result), build_s=round(time.perf_counter() - start, 2),
                                           eval_samples=int(sum(len(next(iter(f.values()))) for f in feeds)))
        log(f"[{name}] {result.line()} on {report['variants'][variant]['eval_samples']} eval samples")
        passed = result.top1_agreement >= min_top1_agreement
        report["variants"][variant].update(passed=passed, min_top1_agreement=min_top1_agreement)
        if not passed:
            report["failed_variants"].append(variant)
            if not keep_failed_variants:
                out.unlink()
            fate = (f"kept as {out.name} because of --keep-failed-variants" if keep_failed_variants
                    else f"{out.name} deleted (pass --keep-failed-variants to keep it)")
            warn(f"[{name}] {variant} FAILED validation: top1 agreement {result.top1_agreement:.3f} is below "
                 f"--min-top1-agreement {min_top1_agreement:.3f}; {fate}")

    config = default_config(name, spec, onnx_path, model_dir)
    config.save(model_dir / "config.yaml")
    (model_dir / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


def copy_version(repository: Path, name: str, src_version: int, dst_version: int, model_file: str = "model.onnx") -> Path:
    """Publish a file of one version as ``model.onnx`` of another (e.g. the INT8 graph as version 2)."""
    dst = Path(repository) / name / str(dst_version)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(repository) / name / str(src_version) / model_file, dst / "model.onnx")
    return dst
