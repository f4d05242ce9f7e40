"""Calibration and evaluation text: the bundled public-domain excerpts (data/README.md) or a user's file,
tokenized into fixed-length samples for GPTQ/AWQ statistics and token streams for perplexity."""

from __future__ import annotations

from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_TEXT = DATA_DIR / "kjv_calibration.txt"
HELDOUT_TEXT = DATA_DIR / "kjv_heldout.txt"


def read_text(path: str | Path | None, default: Path) -> str:
    path = Path(path).expanduser() if path else default
    if not path.is_file():
        raise ValueError(f"text file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def calibration_samples(tokenizer, text: str, num_samples: int, seq_len: int) -> torch.Tensor:
    """[num_samples, seq_len] token ids: consecutive, non-overlapping windows of the tokenized text (the text
    repeats when it is shorter than num_samples * seq_len, so a small --calib-data file still works)."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need --num-samples >= 1 and --seq-len >= 2; got {num_samples} and {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(f"calibration text has {len(ids)} tokens; --seq-len {seq_len} needs at least that many")
    needed = num_samples * seq_len
    repeats = -(-needed // len(ids))
    stream = torch.tensor((ids * repeats)[:needed], dtype=torch.long)
    return stream.view(num_samples, seq_len)
