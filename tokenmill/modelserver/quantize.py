"""FP16 conversion and INT8 static quantization (QDQ, calibrated) with onnxruntime, plus agreement checks.

Agreement is measured against the fp32 graph on a fixed evaluation set: top-1 agreement and logit drift.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 weights and compute; inputs and outputs stay fp32 so clients need not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return Path(dst)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer warns through the root logger about what it handles itself: per-channel requested on
    1-D weights (it quantizes them per tensor: one line per LayerNorm, ~30 for MiniLM), the opset it raises for
    16-bit QDQ. The agreement check after quantization is the real verdict, so those lines are muted here."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def to_int8(src: str | Path, dst: str | Path, calibration: list[dict[str, np.ndarray]], per_channel: bool = True,
            activation_bits: int = 8) -> Path:
    """Static INT8 (QDQ: int8 weights per channel, uint8 activations) calibrated on ``calibration``.

    ``activation_bits=16`` keeps int8 weights but uint16 activations (A16W8, com.microsoft QDQ ops): depthwise
    nets such as EfficientNet have per-tensor activation ranges too wide for 8 bits (measured: top-1 collapses).
    """
    if activation_bits not in (8, 16):
        raise ValueError(f"activation_bits ({activation_bits}) must be 8 or 16")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ValueError("calibration must hold at least one feed (input name -> array)")
    prepped = Path(dst).with_suffix(".prep.onnx").resolve()
    src = Path(src).resolve()
    # Symbolic shape inference writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data) into the working
    # directory: run it from a temporary one so nothing is left in the caller's.
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch), _quiet_quantizer():
        try:
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=False)
        except Exception:  # noqa: BLE001 - symbolic inference gives up on some dynamic-sequence graphs (BERT)
            quant_pre_process(str(src), str(prepped), skip_symbolic_shape=True)
    try:
        with _quiet_quantizer():
            quantize_static(
                str(prepped),
                str(dst),
                _FeedReader(calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8 if activation_bits == 8 else QuantType.QUInt16,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"UseQDQContribOps": activation_bits == 16},
            )
    finally:
        prepped.unlink(missing_ok=True)
    return Path(dst)


@dataclass
class Agreement:
    variant: str
    top1_agreement: float  # fraction of samples whose argmax equals the fp32 argmax
    max_abs_logit_diff: float
    accuracy: float | None = None  # against labels, when the eval set has them
    reference_accuracy: float | None = None

    def line(self) -> str:
        text = f"{self.variant}: top1 agreement {self.top1_agreement:.3f}, max |dlogit| {self.max_abs_logit_diff:.3g}"
        if self.accuracy is not None:
            text += f", accuracy {self.reference_accuracy:.3f} -> {self.accuracy:.3f}"
        return text


def run_all(path: str | Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0].astype(np.float32) for f in feeds])


def agreement(
    reference: str | Path, candidate: str | Path, variant: str, feeds: list[dict[str, np.ndarray]],
    labels: np.ndarray | None = None,
) -> Agreement:
    ref, got = run_all(reference, feeds), run_all(candidate, feeds)
    result = Agreement(variant, float((ref.argmax(-1) == got.argmax(-1)).mean()), float(np.abs(ref - got).max()))
    if labels is not None:
        result.reference_accuracy = float((ref.argmax(-1) == labels).mean())
        result.accuracy = float((got.argmax(-1) == labels).mean())
    return result
