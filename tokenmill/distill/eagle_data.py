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

from tokenmill.model.hf_cache import kv_cache_kwargs


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


@torch.no_grad()
def generate_with_features(teacher: nn.Module, prompts: list[list[int]], max_new: int, eos_id: int | None,
                           ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The teacher's greedy answers to ``prompts`` (one left-padded batch, KV cache) and, per sequence, its features
    over prompt + answer ([len, hidden] fp16), taken while generating: no second pass over the text. Position ids
    follow each row's own tokens, so padding changes nothing but rounding."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + p for pad, p in zip(pads, prompts, strict=True)])
    mask = torch.tensor([[0] * pad + [1] * len(p) for pad, p in zip(pads, prompts, strict=True)])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    head = teacher.get_output_embeddings().weight
    cache = DynamicCache()
    feats = teacher.model(ids, attention_mask=mask, position_ids=positions,
                          **kv_cache_kwargs(teacher.model, cache)).last_hidden_state.float()
    prompt_feats = [feats[row, pad:] for row, pad in enumerate(pads)]
    tokens = [(feats[:, -1] @ head.T).argmax(-1)]
    step_feats: list[torch.Tensor] = []
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        positions = positions[:, -1:] + 1
        out = teacher.model(tokens[-1][:, None], attention_mask=mask, position_ids=positions,
                            **kv_cache_kwargs(teacher.model, cache))
        step_feats.append(out.last_hidden_state[:, 0].float())
        if eos_id is not None:
            finished |= tokens[-1] == eos_id
        if bool(finished.all()) or len(tokens) == max_new:
            break
        tokens.append((step_feats[-1] @ head.T).argmax(-1))
    answers, features = [], []
    generated = torch.stack(tokens, 1).tolist()
    for row, row_tokens in enumerate(generated):
        n = row_tokens.index(eos_id) + 1 if eos_id is not None and eos_id in row_tokens else len(row_tokens)
        answers.append(row_tokens[:n])
        features.append(torch.cat([prompt_feats[row], torch.stack([f[row] for f in step_feats[:n]])]).half())
    return answers, features


@torch.inference_mode()
def batched_features(teacher: nn.Module, records: list[dict], device: str | torch.device, end: float | None = None,
                     batch_tokens: int = 32_768, tf32: bool = False) -> tuple[FeatureSet, list[int], dict]:
    """The teacher's post-norm last hidden states over prompt + answer of ``records`` (fp16, on ``device``, where the
    teacher is), in length-sorted right-padded batches of at most ``batch_tokens`` ids (causal attention: padding
    after a row never reaches it), taken in a shuffled order so a deadline (``end``, ``time.time()``, checked after
    the first batch) drops a random share; (FeatureSet, the indices of the records it holds, a check: the share of
    answer tokens the teacher's head agrees with on these features, ~1.0 for its greedy answers). ``tf32``: CUDA
    matmuls in TF32 (faster; the features then round differently)."""
    import random

    started = time.time()
    sequences = [r["prompt_ids"] + r["output_ids"] for r in records]
    order = sorted(range(len(records)), key=lambda i: len(sequences[i]))
    batches, batch = [], []
    for i in order:
        if batch and (len(batch) + 1) * len(sequences[i]) > batch_tokens:
            batches.append(batch)
            batch = []
        batch.append(i)
    batches += [batch] if batch else []
    random.Random(0).shuffle(batches)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    feats: dict[int, torch.Tensor] = {}
    try:
        for batch in batches:
            if feats and end is not None and time.time() > end:
                break
            width = max(len(sequences[i]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.int64)
            for row, i in enumerate(batch):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            hidden = teacher.model(ids.to(device)).last_hidden_state
            for row, i in enumerate(batch):
                feats[i] = hidden[row, : len(sequences[i])].half()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    done = sorted(feats)
    data = FeatureSet.from_sequences([torch.tensor(sequences[i], device=device) for i in done],
                                     [feats[i] for i in done], [len(records[i]["prompt_ids"]) for i in done])
    head = teacher.get_output_embeddings().weight
    agree = total = 0
    for i in done[:256]:
        p = len(records[i]["prompt_ids"])
        guesses = (feats[i][p - 1 : -1].float() @ head.T).argmax(-1).cpu()
        agree += int((guesses == torch.tensor(records[i]["output_ids"])).sum())
        total += len(records[i]["output_ids"])
    check = {"sequences": len(done), "left_out": len(records) - len(done), "tokens": int(data.ids.numel()),
             "tf32": tf32, "seconds": round(time.time() - started, 1),
             "teacher_argmax_equals_answer_first_256": agree / max(1, total)}
    return data, done, check
