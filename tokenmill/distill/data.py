"""Distillation text: a text file, a JSONL file ({"text": ...} per line) or the bundled KJV excerpts, cut into
token windows (decoder students) or sentences (encoder students), and a batch order that is a pure function
of (seed, batch index) so a resumed run reads exactly the batches an uninterrupted one would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

DATA_DIR = Path(__file__).parent / "data"
TRAIN_TEXT = DATA_DIR / "kjv_train.txt"
# Genesis, Judges, 1 Samuel, Matthew, John, Acts: narrative prose beside TRAIN_TEXT's poetry, added to the
# encoder's default sentences (a 2-layer student fit 3.8k sentences' embeddings better than held-out ones).
NARRATIVE_TEXT = DATA_DIR / "kjv_narrative.txt"
# Ruth + Ecclesiastes 1-6, shared with `tokenmill eval perplexity`; disjoint from TRAIN_TEXT (Proverbs, Psalms).
HELDOUT_TEXT = Path(__file__).parent.parent / "quantization" / "data" / "kjv_heldout.txt"
HELDOUT_FRACTION = 0.1  # with a user's --data and no --eval-data: its last tenth is held out


def read_corpus(path: str | Path) -> str:
    """The text of a .txt file, or the "text" fields of a .jsonl file joined by newlines."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path.name} line {number} is not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path.name} line {number} must be an object with a "text" string')
            texts.append(record["text"])
        raw = "\n".join(texts)
    if not raw.strip():
        raise ValueError(f"data file {str(path)!r} is empty; distillation needs text to train on")
    return raw


def train_and_heldout_text(data: str | None, eval_data: str | None) -> tuple[str, str | None, str]:
    """(training text, held-out text or None = split the training tokens, where each came from)."""
    train = read_corpus(data or TRAIN_TEXT)
    if eval_data:
        return train, read_corpus(eval_data), f"{data or TRAIN_TEXT.name} / {eval_data}"
    if data is None:
        return train, read_corpus(HELDOUT_TEXT), f"{TRAIN_TEXT.name} / {HELDOUT_TEXT.name} (bundled KJV)"
    return train, None, f"{data} (last {HELDOUT_FRACTION:.0%} held out)"


def token_windows(ids: list[int], seq_len: int) -> torch.Tensor:
    """[n, seq_len] consecutive non-overlapping windows (the tail shorter than a window is dropped)."""
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def split_windows(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last HELDOUT_FRACTION of the windows (at least one) are held out."""
    held = max(1, round(len(windows) * HELDOUT_FRACTION))
    return windows[:-held], windows[-held:]


_SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")


def sentences(text: str, min_chars: int = 12, max_chars: int = 400) -> list[str]:
    """Sentence-like pieces (split at . ; : ? ! and newlines) of a readable length, for encoder students."""
    pieces = []
    for line in text.splitlines():
        pieces += [p.strip() for p in _SENTENCE_END.split(line)]
    return [p[:max_chars] for p in pieces if len(p) >= min_chars]


class BatchOrder:
    """Batch ``index`` holds positions [index * B, (index + 1) * B) of an endless sequence of per-epoch
    permutations of ``num_examples`` items, each drawn from a generator seeded with (seed, epoch)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int) -> None:
        if num_examples < 1:
            raise ValueError("the training data yields no examples; give a longer --data file or a shorter --seq-len")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self._epochs: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epochs = {epoch: torch.randperm(self.num_examples, generator=generator)}
        return self._epochs[epoch]

    def indices(self, index: int) -> list[int]:
        out = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(position, self.num_examples)
            out.append(int(self._permutation(epoch)[offset]))
        return out
