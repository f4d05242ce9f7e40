"""Pre- and post-processing for the task endpoints: image bytes -> tensor -> top-k labels, text -> sentiment.

Also builds the fixed evaluation sets (scikit-image photos, held-out sentences) used by export and tests.
"""

from __future__ import annotations

import io

import numpy as np

from tokenmill.modelserver import bundled
from tokenmill.modelserver.errors import BadInputError


def _bad_image(exc: Exception) -> BadInputError:
    return BadInputError(f"could not decode the image ({exc}); expected the bytes of a PNG or JPEG file")


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes (PNG, JPEG, ...) -> HxWx3 uint8 RGB at full size."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInputError("image body is empty; expected the bytes of a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise _bad_image(exc) from exc


def decode_resized(data: bytes, height: int = bundled.IMAGE_SIZE, width: int = bundled.IMAGE_SIZE) -> np.ndarray:
    """Image file bytes -> height x width x 3 uint8 RGB, the served classifier's fast path.

    A JPEG larger than needed decodes at a reduced DCT scale (PIL ``draft``: 1/2, 1/4 or 1/8 while both sides stay
    at least the target), which skips most of the decode and of the resize; one bicubic resize then goes straight to
    the input size. Normalisation is left to the batch (``normalize_images`` or the backend's own, on the GPU)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInputError("image body is empty; expected the bytes of a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (width, height))  # a no-op for formats other than JPEG
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.BICUBIC)
            return np.asarray(rgb)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise _bad_image(exc) from exc


def _mean_std_affine() -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) per channel so that ``uint8 * scale + shift`` = ``(uint8 / 255 - mean) / std``."""
    mean = np.asarray(bundled.IMAGENET_MEAN, np.float32)
    std = np.asarray(bundled.IMAGENET_STD, np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


PIXEL_SCALE, PIXEL_SHIFT = _mean_std_affine()


def normalize_images(pixels: np.ndarray) -> np.ndarray:
    """N x H x W x 3 uint8 -> N x 3 x H x W float32, ImageNet mean/std, in one pass over the whole batch."""
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    np.multiply(pixels.transpose(0, 3, 1, 2), PIXEL_SCALE[:, None, None], out=out)
    out += PIXEL_SHIFT[:, None, None]
    return out


def preprocess_image(rgb: np.ndarray, size: int = bundled.IMAGE_SIZE) -> np.ndarray:
    """HxWx3 uint8 -> 3xSxS float32, resized (no crop) and ImageNet-normalised."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("RGB").resize((size, size), Image.BICUBIC)
    return normalize_images(np.asarray(img)[None])[0]


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def top_k(logits: np.ndarray, labels: list[str], k: int = 5) -> list[dict]:
    """One row of logits -> the k best classes with softmax probabilities."""
    z = logits.astype(np.float64)
    exp = np.exp(z - z.max())
    probs = exp / exp.sum()
    best = np.argpartition(-z, k - 1)[:k] if k < len(z) else np.arange(len(z))
    best = best[np.argsort(-z[best], kind="stable")]
    return [{"index": int(i), "label": labels[i], "probability": float(probs[i])} for i in best]


def sentiment(logits: np.ndarray, labels: list[str]) -> dict:
    z = logits.astype(np.float64) - logits.max()
    probs = np.exp(z) / np.exp(z).sum()
    best = int(probs.argmax())
    return {"label": labels[best], "scores": {name: float(p) for name, p in zip(labels, probs, strict=True)}}


def check_texts(texts: list) -> list[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise BadInputError(f"text[{i}] is empty; expected a non-empty string")
    return texts


def tokenize(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    return encode_texts(tokenizer, check_texts(texts))


def encode_texts(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Already-checked texts -> padded input_ids + attention_mask, in one Rust ``encode_batch`` call."""
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.asarray([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encoded], dtype=np.int64),
    }


EVAL_IMAGE_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field")


def eval_images() -> list[np.ndarray]:
    """A fixed evaluation set: six scikit-image colour photos, each also flipped and centre-cropped (18 images)."""
    from skimage import data

    images = []
    for name in EVAL_IMAGE_NAMES:
        rgb = np.asarray(getattr(data, name)())[..., :3]
        h, w = rgb.shape[:2]
        images += [rgb, rgb[:, ::-1], rgb[h // 6 : h - h // 6, w // 6 : w - w // 6]]
    return images


def image_feeds(images: list[np.ndarray], batch_size: int = 6) -> list[dict[str, np.ndarray]]:
    batch = np.stack([preprocess_image(img) for img in images])
    return [{"images": batch[i : i + batch_size]} for i in range(0, len(batch), batch_size)]


def text_feeds(tokenizer, texts: list[str], batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    return [tokenize(tokenizer, texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
