"""The EAGLE draft head's training data: the teacher's last-layer hidden states (after its final norm, the features
its LM head reads) over its own answers, computed once and cached, since the head is trained on them for many
epochs and the teacher's forward is ~30x the head's cost.

Input: the JSONL of teacher answers ``tokenmill distill --teacher-generated`` writes (``prompt_ids`` +
``output_ids`` per line). Output: one ``.pt`` file with every sequence's ids and features concatenated (features
fp16: post-norm values are O(1)-O(10), where fp16 keeps ~3 decimal digits) plus offsets.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class FeatureSet:
    """Sequences (prompt + answer) with the teacher's post-norm last hidden state at every position."""

    ids: torch.Tensor  # [N] int64, all sequences concatenated
    features: torch.Tensor  # [N, hidden] fp16
    offsets: torch.Tensor  # [S + 1] int64: sequence i is ids[offsets[i]:offsets[i+1]]
    prompt_lens: torch.Tensor  # [S] int64: the first prompt_lens[i] ids of sequence i are the prompt

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def sequence(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[lo:hi], self.features[lo:hi], int(self.prompt_lens[i])

    def subset(self, indices: range | list[int]) -> FeatureSet:
        parts = [self.sequence(i) for i in indices]
        return FeatureSet.from_sequences([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])

    @staticmethod
    def from_sequences(ids: list[torch.Tensor], features: list[torch.Tensor], prompt_lens: list[int]) -> FeatureSet:
        lengths = torch.tensor([0] + [x.numel() for x in ids], dtype=torch.int64)
        return FeatureSet(torch.cat(ids), torch.cat(features), lengths.cumsum(0), torch.tensor(prompt_lens))

    def save(self, path: Path) -> None:
        torch.save({"ids": self.ids, "features": self.features, "offsets": self.offsets,
                    "prompt_lens": self.prompt_lens}, path)

    @staticmethod
    def load(path: Path) -> FeatureSet:
        data = torch.load(path, weights_only=True)
        return FeatureSet(data["ids"], data["features"], data["offsets"], data["prompt_lens"])


def read_answers(path: Path) -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no teacher answers")
    return records


@torch.no_grad()
def teacher_features(teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[T, hidden] fp32: the teacher's final-norm output for ``ids`` [T] (HF decoders' ``last_hidden_state``)."""
    return teacher.model(ids[None]).last_hidden_state[0].float()


def compute_features(teacher: nn.Module, records: list[dict], log_every: int = 100) -> tuple[FeatureSet, dict]:
    """Features for every record, and a check: the share of answer tokens equal to the argmax of the teacher's
    head on these features (the answers are the teacher's greedy output, so ~1.0 unless numerics differ)."""
    ids_list, feats, prompt_lens = [], [], []
    agree = total = 0
    head = teacher.get_output_embeddings().weight
    started = time.perf_counter()
    for n, record in enumerate(records):
        ids = torch.tensor(record["prompt_ids"] + record["output_ids"], dtype=torch.int64)
        feat = teacher_features(teacher, ids)
        prompt_len = len(record["prompt_ids"])
        guesses = (feat[prompt_len - 1 : -1] @ head.T).argmax(-1)
        agree += int((guesses == ids[prompt_len:]).sum())
        total += ids.numel() - prompt_len
        ids_list.append(ids)
        feats.append(feat.to(torch.float16))
        prompt_lens.append(prompt_len)
        if log_every and (n + 1) % log_every == 0:
            print(f"features: {n + 1}/{len(records)} sequences, {time.perf_counter() - started:.0f} s", flush=True)
    check = {"answer_tokens": total, "teacher_argmax_equals_answer": agree / max(1, total),
             "seconds": round(time.perf_counter() - started, 1)}
    return FeatureSet.from_sequences(ids_list, feats, prompt_lens), check
