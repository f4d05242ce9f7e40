"""The classifier's fast image path: JPEG draft decode + one resize to uint8, normalisation per batch (numpy or the
torch backend), top-k; checked against the full-size float path on real photos and fresh random pixels."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from tokenmill.modelserver import bundled, processing
from tokenmill.modelserver.errors import BadInputError

CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def jpeg(rgb: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    img = Image.fromarray(rgb)
    if size:
        img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def reference_normalise(pixels: np.ndarray) -> np.ndarray:
    """(x / 255 - mean) / std in float64, N x H x W x 3 -> N x 3 x H x W."""
    x = pixels.astype(np.float64) / 255.0
    x = (x - np.asarray(bundled.IMAGENET_MEAN)) / np.asarray(bundled.IMAGENET_STD)
    return x.transpose(0, 3, 1, 2)


def test_normalize_images_matches_the_formula_on_random_pixels():
    pixels = np.random.default_rng(3).integers(0, 256, (3, 17, 23, 3), dtype=np.uint8)
    got = processing.normalize_images(pixels)
    assert got.dtype == np.float32 and got.shape == (3, 3, 17, 23)
    np.testing.assert_allclose(got, reference_normalise(pixels), atol=1e-5)


def test_png_fast_path_equals_the_full_size_float_path():
    rgb = data.astronaut()
    png = processing.encode_png(rgb)
    pixels = processing.decode_resized(png)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    np.testing.assert_allclose(processing.normalize_images(pixels[None])[0], processing.preprocess_image(rgb),
                               atol=1e-5)


def test_large_jpeg_decodes_at_reduced_scale_close_to_the_full_decode():
    body = jpeg(data.rocket(), size=(1280, 854))  # 1/2 scale (640 x 427) still covers 224 x 224
    with Image.open(io.BytesIO(body)) as img:
        img.draft("RGB", (224, 224))
        assert img.size == (640, 427)  # the decode really is reduced
    fast = processing.decode_resized(body).astype(np.float32)
    full = np.asarray(Image.fromarray(processing.decode_image(body)).resize((224, 224), Image.BICUBIC), np.float32)
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast - full).mean() < 3.0  # out of 255: DCT-domain scaling is a slightly different low-pass
    assert processing.decode_resized(body, 160, 320).shape == (160, 320, 3)  # height, width


@pytest.mark.parametrize("body", [b"", b"not an image", jpeg(data.chelsea())[:500]], ids=["empty", "junk", "truncated"])
def test_undecodable_bytes_are_bad_input(body):
    with pytest.raises(BadInputError, match="PNG or JPEG"):
        processing.decode_resized(body)


def test_grey_and_rgba_images_become_rgb():
    grey = Image.fromarray(data.camera())
    buf = io.BytesIO()
    grey.save(buf, format="JPEG")
    assert processing.decode_resized(buf.getvalue()).shape == (224, 224, 3)
    rgba = np.dstack([data.chelsea(), np.full(data.chelsea().shape[:2], 128, np.uint8)])
    assert processing.decode_resized(processing.encode_png(rgba)).shape == (224, 224, 3)


def test_top_k_is_sorted_and_matches_a_full_sort():
    logits = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    labels = [f"c{i}" for i in range(1000)]
    for k in (1, 5, 1000):
        got = processing.top_k(logits, labels, k)
        assert [p["index"] for p in got] == np.argsort(-logits, kind="stable")[:k].tolist()
        assert abs(sum(p["probability"] for p in processing.top_k(logits, labels, 1000)) - 1.0) < 1e-9


def test_served_jpeg_top5_equals_v2_infer_on_the_same_pixels(server):
    """/v1/classify (uint8 pixels, normalised in the batch) agrees with /v2 infer on the float tensor of the same
    pixels, and chelsea as a JPEG is a cat."""
    body = jpeg(data.chelsea())
    reply = httpx.post(f"http://{server}/v1/classify/classifier?top_k=5", content=body,
                       headers={"content-type": "image/jpeg"}, timeout=60)
    assert reply.status_code == 200, reply.text
    predictions = reply.json()["predictions"]
    tensor = processing.normalize_images(processing.decode_resized(body)[None])
    infer = httpx.post(f"http://{server}/v2/models/classifier/infer", timeout=60, json={"inputs": [
        {"name": "images", "shape": list(tensor.shape), "datatype": "FP32", "data": tensor.ravel().tolist()}]})
    logits = np.asarray(infer.json()["outputs"][0]["data"], np.float32)
    assert [p["index"] for p in predictions] == np.argsort(-logits, kind="stable")[:5].tolist()
    assert predictions[0]["index"] in CATS
