"""Pre- and post-processing for the task endpoints: image bytes -> tensor -> top-k labels, text -> sentiment.

Also builds the fixed evaluation sets (scikit-image photos, held-out sentences) used by export and tests.
"""

from __future__ import annotations

import io

import numpy as np

from tokenmill.modelserver import bundled
from tokenmill.modelserver.errors import BadInputError


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes (PNG, JPEG, ...) -> HxWx3 uint8 RGB."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadInputError("image body is empty; expected the bytes of a PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInputError(f"could not decode the image ({exc}); expected the bytes of a PNG or JPEG file") from exc


def preprocess_image(rgb: np.ndarray, size: int = bundled.IMAGE_SIZE) -> np.ndarray:
    """HxWx3 uint8 -> 3xSxS float32, resized (no crop) and ImageNet-normalised."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(bundled.IMAGENET_MEAN, np.float32)) / np.asarray(bundled.IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def encode_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def top_k(logits: np.ndarray, labels: list[str], k: int = 5) -> list[dict]:
    """One row of logits -> the k best classes with softmax probabilities."""
    z = logits.astype(np.float64) - logits.max()
    probs = np.exp(z) / np.exp(z).sum()
    best = np.argsort(-probs)[:k]
    return [{"index": int(i), "label": labels[i], "probability": float(probs[i])} for i in best]


def sentiment(logits: np.ndarray, labels: list[str]) -> dict:
    z = logits.astype(np.float64) - logits.max()
    probs = np.exp(z) / np.exp(z).sum()
    best = int(probs.argmax())
    return {"label": labels[best], "scores": {name: float(p) for name, p in zip(labels, probs, strict=True)}}


def image_tensor(data: bytes, size: int = bundled.IMAGE_SIZE) -> np.ndarray:
    """Image file bytes -> 1x3xSxS float32, ready to batch (run off the event loop: PIL releases the GIL)."""
    return preprocess_image(decode_image(data), size)[None]


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
